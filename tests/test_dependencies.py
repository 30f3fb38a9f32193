"""pyproject.toml declares every package infllava_jax imports, and nothing it does not."""

import ast
import functools
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NO_DEPS = PYPROJECT["tool"]["infllava"]["no-deps"]


def distribution_name(requirement: str) -> str:
  """'etils[epath]==1.15.0' -> 'etils'; names compared as PEP 503 normalises them."""
  return normalised(re.match(r"[A-Za-z0-9._-]+", requirement).group())


def normalised(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def imports() -> dict[str, bool]:
  """Top-level module -> whether some file imports it at module scope (not only inside a
  function, as the optional torch and libtpu are)."""
  found = {}
  for path in (ROOT / "infllava_jax").rglob("*.py"):
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        found[top] = found.get(top, False) or id(node) not in in_function
  return {m: scope for m, scope in found.items()
          if m not in sys.stdlib_module_names and m != "infllava_jax"}


def distributions(module: str) -> set[str]:
  """The installed distributions that provide `module`; its own name when none is installed
  (libtpu, an extra)."""
  return {normalised(d) for d in installed().get(module, [module])}


@functools.cache
def installed() -> dict[str, list[str]]:
  return importlib.metadata.packages_distributions()


def test_every_import_is_declared():
  required = {distribution_name(r) for r in PROJECT["dependencies"]}
  optional = {distribution_name(r) for extra in PROJECT["optional-dependencies"].values()
              for r in extra}
  optional |= {distribution_name(r) for r in NO_DEPS}  # optional, installed --no-deps
  found = imports()
  assert {"jax", "absl", "torch"} <= set(found) and not found["torch"]  # the walk sees them
  undeclared = {m: distributions(m) for m, module_scope in found.items()
                if not distributions(m) & (required if module_scope else required | optional)}
  assert not undeclared, f"imported by infllava_jax, missing from pyproject.toml: {undeclared}"


def test_every_dependency_is_imported():
  provided = set().union(*map(distributions, imports()))
  unused = {distribution_name(r) for r in PROJECT["dependencies"]} - provided
  assert not unused, f"declared in pyproject.toml, imported nowhere in infllava_jax: {unused}"
