"""Mesh shapes from the config's `mesh` field, the errors for ones that cannot be built,
param specs fitted to shapes their mesh axes do not divide, and the logical axis rules the
config's `sharding.rules` gives (the batch's placement included)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.config import ConfigError, load_config


@pytest.mark.parametrize("spec, shape", [
    ("fsdp=4,tensor=2", {"data": 1, "fsdp": 4, "tensor": 2}),
    ("data=2,fsdp=-1", {"data": 2, "fsdp": 4, "tensor": 1}),
    ({"tensor": 8}, {"data": 1, "fsdp": 1, "tensor": 8}),
])
def test_parse_mesh(spec, shape):
  assert sharding.parse_mesh(spec, 8) == shape


@pytest.mark.parametrize("spec, words", [
    ("fsdp:8", "or 'axis=size,...' with axes ('data', 'fsdp', 'tensor')"),
    ("fsdp=eight", "axis sizes must be integers"),
    ("fsdp=0,tensor=-1", "axis sizes must be >= 1 (or one -1), got {'fsdp': 0}"),
    ("tensor=3,fsdp=-1", "the other axes take 3 devices, which does not divide the 8 available"),
    ("fsdp=-1,tensor=-1", "at most one axis may be -1"),
    ("pipeline=8", "mesh axes ['pipeline'] unknown"),
    ("fsdp=4", "needs 4 devices; 8 are available"),
])
def test_parse_mesh_errors_say_what_is_wrong(spec, words):
  with pytest.raises(ValueError) as error:
    sharding.parse_mesh(spec, 8)
  assert words in str(error.value)


MESH = {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("spec, shape, fitted, left_out", [
    # LLaMA-3's embedding and lm_head: 128,257 rows; `tensor` joins `fsdp` on the width.
    (P("tensor", "fsdp"), (128257, 4096), P(None, ("fsdp", "tensor")), []),
    (P("fsdp", "tensor"), (4096, 128257), P(("fsdp", "tensor"), None), []),
    (P("fsdp", "tensor"), (4096, 1024), P("fsdp", "tensor"), []),  # divides: unchanged
    (P(None, "fsdp", "tensor"), (3, 4096, 1024), P(None, "fsdp", "tensor"), []),
    # Of the two axes on a dimension of 6, `tensor` (2) stays; `fsdp` (4) divides nothing.
    (P(("fsdp", "tensor")), (6,), P("tensor"), ["fsdp"]),
    # The moved axis goes where the most elements per device are left.
    (P("tensor", None, "fsdp"), (5, 4096, 64), P(None, "tensor", "fsdp"), []),
    (P("tensor", None, "fsdp"), (5, 64, 4096), P(None, None, ("fsdp", "tensor")), []),
])
def test_fit_spec_moves_axes_to_dimensions_they_divide(spec, shape, fitted, left_out):
  assert sharding.fit_spec(spec, shape, MESH) == (fitted, left_out)


def test_param_shardings_fit_shapes_and_warn_of_replication():
  mesh = jax.make_mesh((1, 4, 2), sharding.MESH_AXES, devices=jax.devices()[:8])

  def init():
    return {"embed": nn.with_logical_partitioning(jnp.zeros, ("vocab", "embed"))((513, 64)),
            "odd": nn.with_logical_partitioning(jnp.zeros, ("embed", "mlp"))((6, 3))}

  with pytest.warns(UserWarning, match=r"1 param\(s\).*odd \[6, 3\] \(fsdp\)"):
    got = sharding.param_shardings(jax.eval_shape(init), mesh)
  assert got["embed"].spec == P(None, ("fsdp", "tensor"))
  assert got["odd"].spec == P("tensor", None)  # 3 takes no axis; 6 takes `tensor` only


def test_rules_come_from_the_config_default_saved_or_overridden():
  assert sharding.rules_from_config(ConfigDict()) == sharding.LOGICAL_AXIS_RULES
  # A run's config saved as JSON (checkpoints keep it so) holds lists: the same rules.
  saved = ConfigDict(json.loads(load_config("configs/synthetic.py").to_json()))
  assert isinstance(saved.sharding.rules[0], list)
  assert sharding.rules_from_config(saved) == sharding.LOGICAL_AXIS_RULES
  config = load_config("configs/synthetic.py", [
      "--config.sharding.rules=(('batch', 'data'), ('mlp', ['fsdp', 'tensor']), ('norm', None))"])
  assert sharding.rules_from_config(config) == (("batch", "data"), ("mlp", ("fsdp", "tensor")),
                                                ("norm", None))


@pytest.mark.parametrize("rule, words", [
    (("batch",), "got ('batch',) (not a pair)"),
    ("batch", "(not a pair)"),
    ((1, "data"), "(the logical name is not a string)"),
    (("mlp", 2), "(the mesh axes are not a string, a sequence of strings or None)"),
    (("mlp", "model"), "(unknown mesh axes ['model'])"),
    (("batch", ("data", "data")), "(a mesh axis is listed twice)"),
])
def test_bad_rules_name_the_rule_and_what_is_wrong(rule, words):
  config = ConfigDict({"sharding": {"rules": (("embed", "fsdp"), rule)}})
  with pytest.raises(ConfigError) as error:
    sharding.rules_from_config(config)
  assert str(error.value).startswith("sharding.rules[1]: expected (logical name, mesh axis")
  assert words in str(error.value)


def test_batch_sharding_follows_the_rules():
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  assert sharding.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)
  assert sharding.batch_axes() == ("data", "fsdp")
  data_only = (("batch", "data"), ("embed", "fsdp"))
  assert sharding.batch_sharding(mesh, 5, data_only).spec == P("data", None, None, None, None)
  assert sharding.batch_axes(data_only) == ("data",)
  assert sharding.batch_axes((("embed", "fsdp"),)) == ()  # no rule: the batch is replicated
  assert sharding.batch_sharding(mesh, 2, (("embed", "fsdp"),)).is_fully_replicated
