"""The one abstract train state (`training/state.py`): a fresh start is born in its shardings,
a resume restores straight into them, and `infllava compile` lowers the trainer's own step.

The tiny synthetic model on the 8 simulated devices of conftest.py, mesh fsdp=4 x tensor=2;
no test here compiles a train step (lowering only). The 8B stage configs are only traced.
"""

import gc
import re

import jax
import numpy as np
import pytest

from infllava_jax import sharding
from infllava_jax.config import load_config
from infllava_jax.checkpoints import run as checkpoint
from infllava_jax.training import optim
from infllava_jax.training import compile as compile_cli
from infllava_jax.training import state as state_lib
from tests.training.test_loop import assert_trees_equal, host, make_trainer

MESH = ["--config.mesh=fsdp=4,tensor=2"]


def key_path(path) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def test_opt_state_is_placed_like_its_params():
  """Each AdamW moment carries its param's sharding (inherited through `tx.init`, not
  matched afterwards); counts are replicated; the tree is the one `tx.update` takes."""
  config = load_config("configs/synthetic.py", MESH)
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.train_setup(config, mesh, total_steps=10)
  params = {key_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(setup.abstract.params)}
  moments = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(setup.abstract.opt_state):
    keys = key_path(path)
    owners = [params[keys[-n:]] for n in range(len(keys), 0, -1) if keys[-n:] in params]
    if leaf.ndim == 0:
      assert leaf.sharding.is_fully_replicated, jax.tree_util.keystr(path)
      continue
    assert owners, jax.tree_util.keystr(path)
    assert (leaf.shape, leaf.sharding) == (owners[0].shape, owners[0].sharding), \
        jax.tree_util.keystr(path)
    moments += 1
  assert moments == 2 * len(params)  # everything trains in the synthetic config: mu and nu
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(setup.abstract.opt_state)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  unboxed = jax.eval_shape(setup.tx.init, setup.abstract.params)
  assert jax.tree.structure(unboxed) == jax.tree.structure(setup.abstract.opt_state)
  assert setup.abstract.step.shape == () and setup.abstract.step.sharding.is_fully_replicated


def device_bytes() -> int:
  """Bytes of the device buffers the live jax arrays hold (every shard and replica, each
  buffer once: arrays assembled from per-device arrays share their buffers)."""
  buffers = {}
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      buffers[shard.device.id, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
  return sum(buffers.values())


def test_fresh_start_resume_and_compile_share_the_abstract_state(tmp_path, monkeypatch):
  """A fresh state is created in the abstract state's shardings; a resume allocates nothing
  of the state before Orbax reads it into them (no placeholder state, one state in memory);
  the trainer's step and compile's step lower to the same program."""
  devices = jax.devices()
  fresh = make_trainer(tmp_path, MESH, devices=devices)
  abstract = fresh.setup.abstract
  for x, want in zip(jax.tree.leaves(fresh.state), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype, x.sharding) == (want.shape, want.dtype, want.sharding)

  # compile's lowering (abstract state, abstract batch) = the trainer's (its arrays).
  config, mesh = fresh.config, fresh.mesh
  rules = sharding.rules_from_config(config)
  batch = compile_cli.abstract_batch(config, mesh, rules, fresh.global_batch,
                                     config.data.max_length)
  setup = state_lib.train_setup(config, mesh, fresh.total_steps)
  with jax.set_mesh(mesh):
    compiled = state_lib.jit_train_step(setup, config.train).lower(setup.abstract, batch)
    trained = fresh._compiled_step.lower(fresh.state, batch)
  assert compiled.as_text() == trained.as_text()

  fresh.checkpointer.save(3, fresh.state.params, fresh.state.opt_state,
                          fresh.data.grain_iterator, force=True)
  fresh.checkpointer.wait_until_finished()
  saved = host(fresh.state)
  state_bytes = sum(s.data.nbytes for x in jax.tree.leaves(fresh.state)
                    for s in x.addressable_shards)
  layouts = {(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(abstract) if x.ndim}
  del fresh, trained
  gc.collect()
  before = device_bytes()
  placeholders = []
  restore = checkpoint.Checkpointer.restore_newest

  def watched(self, *args, **kwargs):
    placeholders.extend(x.shape for x in jax.live_arrays()
                        if (x.shape, x.dtype, x.sharding) in layouts)
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "restore_newest", watched)
  resumed = make_trainer(tmp_path, MESH, devices=devices)
  assert resumed.start_step == 3 and int(resumed.state.step) == 3
  assert placeholders == []  # nothing laid out as a state leaf exists before the restore
  gc.collect()
  # One state, and the dummy inputs `model.init` was traced with, nothing more.
  inputs = sum(s.data.nbytes for x in resumed.setup.init_args[1:] for s in x.addressable_shards)
  assert device_bytes() - before <= state_bytes + inputs + 1024
  for x, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype, x.sharding) == (want.shape, want.dtype, want.sharding)
  assert_trees_equal(host(resumed.state.params), saved.params)
  assert_trees_equal(host(resumed.state.opt_state), saved.opt_state)


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_configs_build_abstract_state(stage):
  config = load_config(f"configs/infllava_8b_stage{stage}.py")
  assert config.train.lr == (1e-3 if stage == 1 else 2e-5)
  assert config.data.template == ("plain" if stage == 1 else "llama3")
  assert config.data.image_aspect == ("square" if stage == 1 else "pad")
  assert config.data.group_by_modality == (stage == 2)
  assert config.data.max_length == 2048
  mesh = sharding.make_mesh(config.mesh)  # "fsdp": all 8 test devices
  setup = state_lib.train_setup(config, mesh, total_steps=1000)
  params, mask = setup.abstract.params, setup.mask
  paths = optim.param_paths(params)
  trained = {p.split("/")[0] for p, m in zip(jax.tree.leaves(paths), jax.tree.leaves(mask)) if m}
  assert trained == ({"dem", "projector"} if stage == 1 else {"dem", "projector", "llm"})
  dtypes = {p.split("/")[0]: x.dtype for p, x in zip(jax.tree.leaves(paths), jax.tree.leaves(params))}
  assert dtypes["vision"] == np.dtype("bfloat16")
  assert dtypes["llm"] == np.dtype("bfloat16" if stage == 1 else "float32")
  n_trainable = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  assert (n_trainable > 8e9) == (stage == 2)
  # AdamW moments (mu, nu) exist for trainable params only and are split like them over
  # the 8 fsdp devices; a replicated moment would multiply its bytes by 8.
  trainable = [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  grads = compile_cli.tree_shard_bytes(trainable)
  opt = compile_cli.tree_shard_bytes(setup.abstract.opt_state)
  assert 2 * grads <= opt < 2 * grads + 4096
  assert grads < 1.01 * sum(x.size * x.dtype.itemsize for x in trainable) / 8 + 2 ** 20
  # init_include regexes must select params (restore_params_only raises otherwise).
  for pattern in config.train.init_include:
    assert any(re.search(pattern, p) for p in jax.tree.leaves(paths)), pattern
