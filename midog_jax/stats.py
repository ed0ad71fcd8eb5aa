"""The paper's Table 2 per domain: `python -m midog_jax.stats`.

  python -m midog_jax.stats --annotations MIDOG++.json \\
      --splits datasets_xvalidation.csv [--json]

Domains 6a and 6b share tumour type and scanner; the lab tells them apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from midog_jax import commands
from midog_jax import console
from midog_jax.data import annotations
from midog_jax.data import domain_stats


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m midog_jax.stats", description=__doc__.splitlines()[0])
  parser.add_argument("--annotations", required=True, help="path of MIDOG++.json")
  parser.add_argument("--splits", required=True, help="path of datasets_xvalidation.csv")
  parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
  args = parser.parse_args(argv)
  try:
    with console.logging_to_stderr():
      cases = annotations.load_cases(args.annotations, args.splits)
  except annotations.AnnotationError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = domain_stats.domain_table(cases)
  print(json.dumps(rows, indent=1) if args.json else domain_stats.format_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(commands.guard(main))
