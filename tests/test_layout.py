"""The package's architecture, checked: stage order, no cycles, thin entry points.

Shared flat modules come first, then data, model, training, detection,
evaluation, then the entry points. An import against that order is allowed
only where this list and the importing package's docstring both name it.
"""

import ast
import pathlib

import pytest

import midog_jax

PACKAGE = pathlib.Path(midog_jax.__file__).parent
ENTRY_POINTS = {"train", "eval", "detect", "demo", "stats", "experiments", "synthetic", "weights",
                "export", "slides"}
SHARED = {"domains", "sharding", "atomic", "console", "commands"}
STAGES = ("data", "model", "training", "detection", "evaluation")
# (importer, imported): the edges against the stage order, each with its reason
# in the importer's package docstring.
BACK_EDGES = {
    ("training.selection", "detection.sliding_window"),
    ("training.selection", "evaluation.metrics"),
    ("detection.outputs", "evaluation.overlay"),
}
MAX_ENTRY_LINES = 125


def _modules() -> dict[str, pathlib.Path]:
  """{"data.crops": path, "train": path, ...} of every module of the package."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.name != "__init__":
      out[".".join(rel.parts)] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """Modules of the package that `path` imports anywhere (functions included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("midog_jax"):
      base = node.module[len("midog_jax"):].lstrip(".")
      for alias in node.names:
        name = f"{base}.{alias.name}" if base else alias.name
        found.add(name if name in modules else base)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("midog_jax."):
          found.add(alias.name[len("midog_jax."):])
  return {m for m in found if m in modules}


def _rank(module: str) -> int:
  if module in SHARED:
    return 0
  if module in ENTRY_POINTS:
    return len(STAGES) + 1
  return 1 + STAGES.index(module.split(".")[0])


MODULES = _modules()
GRAPH = {m: _imports(p, MODULES) for m, p in MODULES.items()}


def test_every_module_sits_in_a_stage_or_is_named_shared_or_entry():
  for m in MODULES:
    assert m in SHARED or m in ENTRY_POINTS or m.split(".")[0] in STAGES, m


def test_no_library_module_imports_an_entry_point():
  for m, deps in GRAPH.items():
    if m not in ENTRY_POINTS:
      assert not deps & ENTRY_POINTS, (m, deps & ENTRY_POINTS)


def test_imports_follow_the_stage_order_except_the_named_edges():
  back = {(m, d) for m, deps in GRAPH.items() for d in deps if _rank(d) > _rank(m)}
  assert back == BACK_EDGES
  for importer, imported in BACK_EDGES:
    package = importer.split(".")[0]
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert f"`{imported}`" in doc, (importer, imported)


def test_the_import_graph_has_no_cycle():
  state: dict[str, int] = {}

  def visit(m, trail):
    if state.get(m) == 1:
      pytest.fail("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
    if state.get(m) == 2:
      return
    state[m] = 1
    for d in sorted(GRAPH[m]):
      visit(d, trail + [m])
    state[m] = 2

  for m in sorted(GRAPH):
    visit(m, [])


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_are_short(name):
  assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= MAX_ENTRY_LINES


@pytest.mark.parametrize("stage", STAGES)
def test_each_package_docstring_lists_its_modules(stage):
  doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
  for m in MODULES:
    if m.startswith(stage + "."):
      assert f"  {m.split('.', 1)[1]} " in doc, m


def test_configs_have_no_cycle():
  root = PACKAGE.parent / "configs"
  graph = {}
  for path in root.glob("*.py"):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "configs":
        deps |= {a.name for a in node.names}
    graph[path.stem] = deps
  for m, deps in graph.items():
    for d in deps:
      assert m not in graph.get(d, set()), (m, d)
      assert not any(m in graph.get(e, set()) for e in graph.get(d, set())), (m, d)
