"""askd_jax's modules import each other without cycles, function-level imports included."""
from __future__ import annotations

import ast
import graphlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "askd_jax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for p in ROOT.rglob("*.py"):
    parts = p.relative_to(ROOT.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the askd_jax modules it imports anywhere in its file (`from a import b`
  counts as a.b where b is a module, else as a)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in mods)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          pkg = name.split(".")[:len(name.split(".")) - (path.name != "__init__.py")]
          base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
        for a in node.names:
          full = f"{base}.{a.name}"
          deps.update([full] if full in mods else [base] if base in mods else [])
    graph[name] = deps - {name}
  return graph


def test_import_graph_is_acyclic():
  graph = import_graph()
  assert {"askd_jax.train.checkpoint", "askd_jax.train.state_io", "askd_jax.ops"} <= set(graph)
  assert "askd_jax.train.state_io" in graph["askd_jax.train.checkpoint"]  # a local import
  try:
    order = list(graphlib.TopologicalSorter(graph).static_order())
  except graphlib.CycleError as e:
    raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
  assert len(order) == len(graph)


def test_a_cycle_is_reported():
  """The check above can fail: the graph with state_io importing checkpoint again (the
  cycle this package had) is not a DAG."""
  graph = import_graph()
  graph["askd_jax.train.state_io"].add("askd_jax.train.checkpoint")
  try:
    list(graphlib.TopologicalSorter(graph).static_order())
  except graphlib.CycleError as e:
    assert set(e.args[1]) == {"askd_jax.train.checkpoint", "askd_jax.train.state_io"}
  else:
    raise AssertionError("no cycle found")
