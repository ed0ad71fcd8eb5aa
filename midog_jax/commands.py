"""What every command line shares: help, usage errors and broken pipes.

`train` and `demo` take absl flags (ml_collections' `--config.FIELD=VALUE`
overrides need them); `absl_main` answers them as argparse answers the
other commands: `--help` in argparse's layout, a bad flag as one "error:"
line with exit code 2. `guard` runs any command's `main` so that output cut
short by its reader (`... --json | head`) ends quietly.

Nothing here imports a heavy module.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Callable

from midog_jax import console

_HELP = ("-h", "--help", "-help", "-?", "--helpshort", "--helpfull")
_COLUMN = 24  # Where help texts start, as argparse's default formatter.
_WIDTH = 80


def guard(main: Callable[[], int | None]) -> int:
  """`main()`'s exit code; a reader that closed the pipe ends it quietly
  (Python's documented recipe: stdout to /dev/null, exit 1 as `head` expects)."""
  try:
    code = main() or 0
    sys.stdout.flush()
    return code
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def probability(text: str) -> float:
  """An argparse type: a number in [0, 1] (NaN refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0.0 <= value <= 1.0:  # Also false for NaN.
    raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
  return value


def ratio(text: str) -> float:
  """An argparse type: "4:3" or "1.33" -> 1.333 (positive)."""
  w, _, h = text.partition(":")
  value = float(w) / float(h) if h else float(w)
  if not value > 0:
    raise ValueError(text)
  return value


def absl_main(main, module: str, doc: str, argv: list[str] | None = None) -> int:
  """Parses absl flags and calls `main(argv)`, answering as argparse does.

  `--help` prints the module's docstring and its options and exits 0
  (absl's own exits 1); a bad flag is one "error:" line and exit 2.
  `module` is the caller's `__name__`.
  """
  return guard(lambda: _absl_main(main, module, doc, argv))


def _absl_main(main, module: str, doc: str, argv: list[str] | None) -> int:
  console.quiet_startup()
  from absl import flags
  argv = list(sys.argv if argv is None else argv)
  words = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  name = module if module != "__main__" else _module_of(argv[0])
  if any(w in _HELP for w in words):
    # absl files a script's flags under its path, a module's under its name.
    key = argv[0] if module == "__main__" else module
    print(help_text(name, doc, flags.FLAGS.get_flags_for_module(key)), flush=True)
    return 0
  hint = f"see python -m {name} --help"
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e} ({hint})", file=sys.stderr)
    return 2
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # Raised by a config file or a --config.FIELD override that does not fit it.
    print(f"error: the configuration could not be built: {type(e).__name__}: {e} ({hint})",
          file=sys.stderr)
    return 2
  return main(rest) or 0


def help_text(module: str, doc: str, module_flags) -> str:
  """A command's help in argparse's layout: usage, description, options."""
  options = [("-h, --help", "show this help message and exit")]
  for flag in sorted(module_flags, key=lambda f: f.name):
    options.append(_option(flag))
    if flag.name == "config":
      options.append(("--config.FIELD=VALUE", "set one field of the configuration (any "
                      "field; a misspelt one is an error that names it)"))
  options.append(("-v N, --verbosity N", "0: the project's lines (default); 1: debug lines "
                  "and other libraries' information; -1: warnings only"))
  lines = [f"usage: python -m {module} [options]", "", doc.strip(), "", "options:"]
  for left, text in options:
    wrapped = textwrap.wrap(text, _WIDTH - _COLUMN) or [""]
    if len(left) + 2 < _COLUMN - 1:
      lines.append(f"  {left:<{_COLUMN - 2}}{wrapped[0]}")
    else:
      lines += [f"  {left}", " " * _COLUMN + wrapped[0]]
    lines += [" " * _COLUMN + w for w in wrapped[1:]]
  return "\n".join(lines)


def _option(flag) -> tuple[str, str]:
  """("--name VALUE", "help (default: x)") of one absl flag, as argparse writes it."""
  text = (flag.help or "").strip()
  if flag.boolean:
    return f"--{flag.name}", text
  metavar = {"config": "FILE[:ARG]", "workdir": "DIR"}.get(flag.name, flag.name.upper())
  default = flag.default
  if default not in (None, "", False) and not hasattr(default, "to_dict"):
    text += f" (default: {default})"
  return f"--{flag.name} {metavar}", text


def config_text(config, as_json: bool = False) -> str:
  """A configuration as plain YAML (tuples as lists, no Python tags), or JSON."""
  if as_json:
    return config.to_json_best_effort(indent=1)
  import yaml  # ml_collections' own dependency; only --print_config needs it.

  def plain(value):
    if isinstance(value, dict):
      return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    return value

  class Dumper(yaml.SafeDumper):  # Mappings as blocks, lists on one line.
    pass

  Dumper.add_representer(list, lambda d, v: d.represent_sequence(
      "tag:yaml.org,2002:seq", v, flow_style=True))
  return yaml.dump(plain(config.to_dict()), Dumper=Dumper, sort_keys=True,
                   default_flow_style=False, width=_WIDTH).rstrip()


def absl_verbosity() -> int:
  """`--verbosity` when given, else 0: absl's own default, -1, hides INFO."""
  from absl import flags
  flag = flags.FLAGS["verbosity"]
  return flag.value if flag.present else 0


def _module_of(path: str) -> str:
  """midog_jax/train.py -> midog_jax.train."""
  return "midog_jax." + os.path.splitext(os.path.basename(path))[0]
