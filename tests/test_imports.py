"""The package's import graph: no loop between its subpackages (and top-level modules).

Every `import` / `from ... import` of `infllava_jax` in the package's source is read with
`ast` (imports inside functions too: a deferred import still ties the modules together),
each module mapped to its unit: a subpackage (`infllava_jax.checkpoints`) or a top-level
module (`infllava_jax.inference`). A cycle among the units fails, naming it.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "infllava_jax")


def unit_of(module: str) -> str:
  """'infllava_jax.checkpoints.run' -> 'checkpoints'; 'infllava_jax.inference' -> 'inference'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def modules() -> dict[str, str]:
  """{dotted module name: file path} of every module in the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


def imported(path: str, module: str, known: set[str]) -> set[str]:
  """The package's modules `path` imports (absolute and relative imports)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from a.b import c`: c may be a module (a.b.c) or a name in a.b.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
               for a in node.names]
    else:
      continue
    found.update(n for n in names if n.split(".")[0] == "infllava_jax")
  return found


def unit_graph() -> dict[str, set[str]]:
  known = modules()
  graph: dict[str, set[str]] = {}
  for module, path in known.items():
    if module == "infllava_jax":
      continue
    edges = graph.setdefault(unit_of(module), set())
    edges.update(unit_of(m) for m in imported(path, module, set(known)) if m != "infllava_jax")
    edges.discard(unit_of(module))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_loop_between_subpackages():
  graph = unit_graph()
  assert {"checkpoints", "training", "convert", "inference", "evaluate"} <= set(graph)
  assert find_cycle(graph) is None, f"import loop: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("user", ["training", "convert", "inference"])
def test_checkpoints_is_the_low_level_home(user):
  graph = unit_graph()
  assert "checkpoints" in graph[user]
  assert not graph["checkpoints"] & {"training", "convert", "inference", "evaluate", "generate"}


def test_no_private_orbax_module_is_imported():
  for module, path in modules().items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith("orbax") and "._src" in n for n in names), (module, names)
