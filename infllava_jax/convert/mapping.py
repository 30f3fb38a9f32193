"""Checkpoint conversion as data: tables of (PyTorch name pattern -> param path, transform).

A table is a tuple of `Rule`s. A rule's pattern may contain one `{layer}` field; such a rule
fills one slice of a scanned (stacked) parameter whose leading axis is the layer. Each
transform is a named pair of pure numpy functions (to Flax, back to PyTorch), so the same
table serves both directions and conversion never executes anything from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
# torch Linear.weight is [out, in]; our Dense kernel is [in, out].
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
# torch Conv2d.weight is [out, in, kh, kw]; flax Conv kernel is [kh, kw, in, out].
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
  """`torch` is a PyTorch state-dict name, with `{layer}` for a scanned layer index.

  `path` is the '/'-joined param path; with `{layer}` in `torch`, the Flax array has a
  leading layer axis and this rule fills one slice of it.
  """
  torch: str
  path: str
  transform: Transform = IDENTITY

  @property
  def stacked(self) -> bool:
    return "{layer}" in self.torch

  def regex(self) -> re.Pattern:
    return re.compile(re.escape(self.torch).replace(re.escape("{layer}"), r"(\d+)") + r"\Z")

  def torch_name(self, layer: int | None = None) -> str:
    return self.torch.format(layer=layer) if self.stacked else self.torch


Table = tuple[Rule, ...]


def prefixed(table: Table, torch_prefix: str = "", path_prefix: str = "") -> Table:
  """The same table under a PyTorch name prefix and a param-path prefix."""
  join = lambda a, b: f"{a}/{b}" if a else b
  return tuple(Rule(torch_prefix + r.torch, join(path_prefix, r.path), r.transform)
               for r in table)


class ConversionError(ValueError):
  """A checkpoint that does not fit the table: names every offending tensor."""


def match(table: Table, name: str) -> tuple[Rule, int | None] | None:
  """The rule that covers the PyTorch tensor `name`, with its layer index (or None)."""
  for rule in table:
    found = rule.regex().match(name)
    if found:
      return rule, (int(found.group(1)) if rule.stacked else None)
  return None


def torch_shape(rule: Rule, flax_shape) -> tuple[int, ...]:
  """One PyTorch tensor's shape for the Flax shape it maps to (a stacked param's without its
  layer axis), from a zero-byte view: messages then speak the checkpoint's language."""
  return tuple(rule.transform.to_torch(np.broadcast_to(np.uint8(0), tuple(flax_shape))).shape)


def flax_shape(rule: Rule, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  """A PyTorch tensor's shape after the rule's transform (on a zero-byte view, no data)."""
  return tuple(rule.transform.to_flax(np.broadcast_to(np.uint8(0), torch_shape)).shape)


def torch_to_params(tensors: Iterable[tuple[str, np.ndarray]], table: Table,
                    expected: Mapping | None = None, *, source: str = "checkpoint",
                    ignore: Iterable[str] = ()) -> dict:
  """Builds a nested param dict from (name, array) pairs, one tensor at a time.

  `expected`: a tree of objects with `.shape` (e.g. `jax.eval_shape` of init, unboxed);
  when given, every param is checked for presence and shape. `ignore`: regexes of PyTorch
  names that are known and deliberately not loaded. Raises `ConversionError` listing all
  unexpected, missing and mis-shaped tensors by name.
  """
  ignore_res = [re.compile(p) for p in ignore]
  expected_flat = (traverse_util.flatten_dict(expected, sep="/") if expected is not None
                   else None)
  slices: dict[str, dict[int, np.ndarray]] = {}
  got: dict[str, np.ndarray] = {}
  problems: list[str] = []
  for name, array in tensors:
    # Ignored names first: a stacked rule would otherwise claim e.g. CLIP layers past the
    # feature layer, which are known and deliberately skipped.
    if any(p.match(name) for p in ignore_res):
      continue
    found = match(table, name)
    if found is None:
      problems.append(f"unexpected tensor {name!r} {tuple(array.shape)}: no rule maps it")
      continue
    rule, layer = found
    value = rule.transform.to_flax(np.asarray(array))
    if rule.stacked:
      slices.setdefault(rule.path, {})[layer] = value
    else:
      got[rule.path] = value
  for path, by_layer in slices.items():
    rule = next(r for r in table if r.path == path)
    depth = (expected_flat[path].shape[0] if expected_flat and path in expected_flat
             else max(by_layer) + 1)
    missing = [rule.torch_name(i) for i in range(depth) if i not in by_layer]
    extra = [rule.torch_name(i) for i in by_layer if i >= depth]
    problems += [f"missing tensor {n!r}" for n in missing]
    problems += [f"unexpected tensor {n!r}: the model has {depth} layers" for n in extra]
    if not missing and not extra:
      got[path] = np.stack([by_layer[i] for i in range(depth)])
  if expected_flat is not None:
    for path, want in expected_flat.items():
      rule = next((r for r in table if r.path == path), None)
      torch_name = rule.torch_name(0) if rule else "(no rule)"
      if path not in got:
        if not (rule and rule.stacked and path in slices):  # already reported per layer
          problems.append(f"missing tensor {torch_name!r} for param {path}")
      elif tuple(got[path].shape) != tuple(want.shape):
        as_torch = lambda shape: (tuple(shape) if rule is None
                                  else torch_shape(rule, shape[1:] if rule.stacked else shape))
        problems.append(f"shape mismatch for {torch_name!r} (param {path}): expected "
                        f"{as_torch(want.shape)}, found {as_torch(got[path].shape)}")
  if problems:
    raise ConversionError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(got, sep="/")


def params_to_torch(params: Mapping, table: Table) -> Iterator[tuple[str, np.ndarray]]:
  """The inverse direction: yields (PyTorch name, array) one tensor at a time."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for rule in table:
    if rule.path not in flat:
      raise ConversionError(f"param {rule.path} (for {rule.torch_name(0)!r}) is missing")
    value = np.asarray(flat[rule.path])
    if rule.stacked:
      for i in range(value.shape[0]):
        yield rule.torch_name(i), rule.transform.to_torch(value[i])
    else:
      yield rule.torch, rule.transform.to_torch(value)
