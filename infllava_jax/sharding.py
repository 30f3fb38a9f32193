"""The one place that maps logical axis names to mesh axes.

Model code names axes (`embed`, `mlp`, `heads`, ...); a table of rules decides where they
live on a mesh with axes (`data`, `fsdp`, `tensor`). `data` replicates params and splits the
batch; `fsdp` splits the batch and shards params (ZeRO-3 style, gathered per layer by XLA);
`tensor` splits heads and MLP width (Megatron style). A run's table is its config's
`sharding.rules` (`rules_from_config`; default `LOGICAL_AXIS_RULES`), used for the params,
the optimiser state, the batch and the step's activation constraints alike.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from infllava_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Names not listed are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # The training loss is vocabulary-parallel over every param-sharding axis: each device
    # multiplies the whole (data-shard) batch's hidden states by its slice of lm_head's
    # vocabulary, instead of FSDP gathering all of lm_head (1 GiB bf16 at LLaMA-3 size).
    ("loss_batch", "data"),
    ("loss_vocab", ("fsdp", "tensor")),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("norm", None),
)

def default_config() -> ConfigDict:
  """The config's `sharding` section: rules (logical name, mesh axis, axes or None), the
  first rule naming a logical axis wins; names no rule lists are replicated."""
  return ConfigDict(dict(rules=LOGICAL_AXIS_RULES))


def rules_from_config(config: ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` checked and normalised (lists, as a config saved to JSON holds
  them, become tuples); `LOGICAL_AXIS_RULES` when the config has no `sharding` section.
  Raises ConfigError naming the first rule that is not (name, None | axis | (axes, ...))
  over `MESH_AXES`."""
  section = config.get("sharding")
  rules = LOGICAL_AXIS_RULES if section is None else section.get("rules", LOGICAL_AXIS_RULES)
  return tuple(_checked_rule(i, rule) for i, rule in enumerate(rules))


def _checked_rule(index: int, rule: Any) -> tuple[str, Any]:
  def bad(why: str) -> ConfigError:
    return ConfigError(f"sharding.rules[{index}]: expected (logical name, mesh axis, "
                       f"(axes, ...) or None) with mesh axes from {MESH_AXES}, got "
                       f"{rule!r} ({why})")

  if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
    raise bad("not a pair")
  name, axes = rule
  if not isinstance(name, str):
    raise bad("the logical name is not a string")
  if axes is None or isinstance(axes, str):
    listed = [] if axes is None else [axes]
  elif isinstance(axes, Sequence) and all(isinstance(a, str) for a in axes):
    listed = list(axes)
    axes = tuple(axes)
  else:
    raise bad("the mesh axes are not a string, a sequence of strings or None")
  unknown = [a for a in listed if a not in MESH_AXES]
  if unknown:
    raise bad(f"unknown mesh axes {unknown}")
  if len(set(listed)) != len(listed):
    raise bad("a mesh axis is listed twice")
  return name, axes


# Named presets: mesh shape as a function of the device count.
MESH_PRESETS = {
    "data": lambda n: {"data": n, "fsdp": 1, "tensor": 1},
    "fsdp": lambda n: {"data": 1, "fsdp": n, "tensor": 1},
    "fsdp_tensor": lambda n: {"data": 1, "fsdp": max(n // 2, 1), "tensor": min(n, 2)},
}


def parse_mesh(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh shape from a preset name ("fsdp"), "fsdp=4,tensor=2", or a mapping.

  Unnamed axes are 1, except that a single "-1" entry takes what is left.
  """
  if isinstance(spec, str) and spec in MESH_PRESETS:
    shape = MESH_PRESETS[spec](num_devices)
  else:
    if isinstance(spec, str):
      items = [part.split("=") for part in spec.split(",") if part]
      if any(len(item) != 2 for item in items):
        raise ValueError(f"mesh {spec!r}: expected a preset {sorted(MESH_PRESETS)} "
                         f"or 'axis=size,...' with axes {MESH_AXES}")
      try:
        spec = {name.strip(): int(size) for name, size in items}
      except ValueError:
        raise ValueError(f"mesh {spec!r}: axis sizes must be integers") from None
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected {MESH_AXES}")
    shape = {axis: int(spec.get(axis, 1)) for axis in MESH_AXES}
    bad = {axis: size for axis, size in shape.items() if size < 1 and size != -1}
    if bad:
      raise ValueError(f"mesh {spec}: axis sizes must be >= 1 (or one -1), got {bad}")
    free = [axis for axis, size in shape.items() if size == -1]
    if len(free) > 1:
      raise ValueError(f"mesh {spec}: at most one axis may be -1")
    if free:
      rest = int(np.prod([s for s in shape.values() if s != -1]))
      if num_devices % rest:
        raise ValueError(f"mesh {spec}: the other axes take {rest} devices, which does not "
                         f"divide the {num_devices} available")
      shape[free[0]] = num_devices // rest
  total = int(np.prod(list(shape.values())))
  if total != num_devices:
    raise ValueError(f"mesh {shape} needs {total} devices; {num_devices} are available")
  return shape


def make_mesh(spec: str | Mapping[str, int] = "fsdp",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (classic GSPMD propagation)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = parse_mesh(spec, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_sharding(logical_tree: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def param_shardings(abstract_variables: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
                    warn: bool = True) -> Any:
  """NamedShardings for a (boxed, abstract) variable tree from `jax.eval_shape(model.init)`
  (or any tree of boxed and plain leaves: plain ones are replicated).

  The rules' specs, fitted to each param's shape (`fit_spec`): jax refuses an array whose
  dimension its mesh axes do not divide at every jit boundary, which LLaMA-3's vocabulary
  of 128,257 rows over `tensor` would be. An axis that cannot be placed anywhere leaves the
  param replicated over it, with a warning naming the params (unless `warn` is False).
  """
  specs = logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)
  unplaced = []

  def fit(path, named: NamedSharding, leaf) -> NamedSharding:
    spec, left_out = fit_spec(named.spec, leaf.shape, dict(mesh.shape))
    if left_out:
      unplaced.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                      f"{list(leaf.shape)} ({', '.join(left_out)})")
    return NamedSharding(mesh, spec)

  fitted = jax.tree_util.tree_map_with_path(fit, specs, nn.meta.unbox(abstract_variables))
  if unplaced and warn:
    warnings.warn(f"mesh {dict(mesh.shape)}: no dimension of {len(unplaced)} param(s) divides "
                  f"by the axis in brackets, so they are replicated over it (more memory per "
                  f"device): {'; '.join(unplaced)}", stacklevel=2)
  return fitted


def fit_spec(spec: PartitionSpec, shape: Sequence[int],
             mesh_shape: Mapping[str, int]) -> tuple[PartitionSpec, list[str]]:
  """`spec` with every mesh axis on a dimension it divides: (spec, axes left out).

  An axis whose dimension it does not divide (with the axes before it on that dimension)
  moves to the dimension with the most elements per device that it does divide, so the
  param stays as finely sharded: LLaMA-3's embedding [128257, 4096] under (tensor, fsdp)
  becomes [128257, 4096] under (None, (fsdp, tensor)). An axis that divides no dimension is
  left out (replicated).
  """
  dims = [[] if entry is None else [entry] if isinstance(entry, str) else list(entry)
          for entry in tuple(spec) + (None,) * (len(shape) - len(spec))]

  def ways(axes) -> int:
    return int(np.prod([mesh_shape[a] for a in axes]))

  homeless = []
  for size, axes in zip(shape, dims):
    while axes and size % ways(axes):
      homeless.append(axes.pop())
  left_out = []
  for axis in homeless:
    fits = [i for i, size in enumerate(shape) if size % (ways(dims[i]) * mesh_shape[axis]) == 0]
    if fits:
      dims[max(fits, key=lambda i: shape[i] // ways(dims[i]))].append(axis)
    else:
      left_out.append(axis)
  entries = [None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in dims]
  return PartitionSpec(*entries), left_out


def logical_axis_size(name: str) -> int:
  """How many devices the logical axis `name` is split over, under the mesh and rules in
  context (`jax.set_mesh`, `axis_rules`); 1 outside them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes((name,))[0]
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in names if a in mesh.shape]))


def batch_sharding(mesh: Mesh, ndim: int,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
  """Batch arrays split on their leading axis as the rules place `batch` (by default over
  (data, fsdp)), the other axes replicated."""
  return logical_to_sharding(PartitionSpec("batch", *([None] * (ndim - 1))), mesh, rules)


def batch_axes(rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
  """The mesh axes the rules split the batch over, e.g. ("data", "fsdp")."""
  axes = nn.logical_to_mesh_axes(("batch",), list(rules))[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axis_rules(rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Context manager under which `nn.with_logical_constraint` resolves names."""
  return nn.logical_axis_rules(list(rules))


def init_sharded(init_fn, mesh: Mesh, *args,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Runs `init_fn(*args)` (which returns boxed variables) with every param born sharded.

  The shapes and logical names come from `jax.eval_shape`; the real init then runs under
  `jax.jit(out_shardings=...)`, so no param is ever materialised whole on one device.
  Returns (unboxed variables, their NamedShardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), axis_rules(rules):
    variables = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return variables, shardings
