"""A run's Orbax checkpoints: round trips, resharding restores, params alone, crash safety,
damaged steps."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from infllava_jax.presets import _sections
from infllava_jax import sharding
from infllava_jax.errors import ConfigError
from infllava_jax.checkpoints import locate, params as checkpoint_params, run
from infllava_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_params():
  rng = np.random.default_rng(0)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {"vision": {"patch_embed": arr(8, 4)},
          "dem": {"fuse": {"kernel": arr(8, 4), "bias": arr(4)}},
          "projector": {"fc1": {"kernel": arr(4, 8)}},
          "llm": {"layers": {"q": {"kernel": arr(2, 8, 8)}}, "lm_head": {"kernel": arr(8, 16)}}}


def spec_for(x, axes):
  """PartitionSpec putting `axes` on the last two dims of matrices; vectors replicated."""
  return P(*([None] * (x.ndim - 2)), *axes) if x.ndim >= 2 else P()


def shard(tree, mesh, axes):
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_for(x, axes))),
                      tree)


def ckpt_cfg(**overrides):
  cfg = _sections.checkpoint_config()
  cfg.update(dict(every_steps=2, max_to_keep=2))
  cfg.update(overrides)
  return cfg


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def dataset():
  return grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()


def test_save_restore_round_trip_with_data_and_config(tmp_path):
  params = toy_params()
  train_cfg = _sections.train_config(1)
  tx = optim.make_optimizer(train_cfg, 10, params)
  opt_state = tx.init(params)
  opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)[1]
  config = ConfigDict(dict(model=dict(width=8, layers=(1, 2)), train=train_cfg))
  data = iter(dataset())
  with run.Checkpointer(tmp_path / "run", ckpt_cfg(), config) as ckpt:
    saved = []
    for step in range(1, 8):
      next(data)
      if ckpt.should_save(step):
        saved.append(ckpt.save(step, params, opt_state, data))
    assert saved == [True, True, True]
    assert ckpt.save(7, params, opt_state, data, force=True)
    assert not ckpt.save(7, params, opt_state, data, force=True)   # already on disk
    ckpt.wait_until_finished()
    assert list(ckpt.all_steps()) == [6, 7]                          # keep-last-2
    expected_next = [np.asarray(next(data)) for _ in range(2)]

  ckpt = run.Checkpointer(tmp_path / "run", ckpt_cfg())
  device = SingleDeviceSharding(jax.devices()[0])
  out = ckpt.restore(checkpoint_params.abstract_tree(params, device),
                     checkpoint_params.abstract_tree(opt_state, device), iter(dataset()))
  ckpt.close()
  assert out.step == 7
  assert_trees_equal(out.params, params)
  assert_trees_equal(out.opt_state, opt_state)
  assert int(out.opt_state.inner_states["group_default"].inner_state[0].count) == 1
  np.testing.assert_array_equal(next(out.data_iterator), expected_next[0])
  np.testing.assert_array_equal(next(out.data_iterator), expected_next[1])

  stored = locate.checkpoint_config(tmp_path / "run")
  assert stored.model.width == 8 and list(stored.model.layers) == [1, 2]
  assert stored.train.lr == 1e-3 and stored.train.max_grad_norm is None
  with pytest.raises(FileNotFoundError, match="step 3"):
    run.Checkpointer(tmp_path / "run", ckpt_cfg()).restore(params, opt_state, step=3)


def test_restore_by_another_number_of_processes_says_so(tmp_path):
  params = toy_params()
  opt_state = optim.make_optimizer(_sections.train_config(1), 10, params).init(params)
  with run.Checkpointer(tmp_path / "run", ckpt_cfg()) as ckpt:
    ckpt.save(4, params, opt_state, iter(dataset()), force=True)
  # As a 2-process run would have left it (grain writes one file per process).
  data = tmp_path / "run" / "4" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  device = SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(ValueError, match="step 4's data position was saved by 2 processes and "
                                       "this run has 1: resume with as many processes"):
    run.Checkpointer(tmp_path / "run", ckpt_cfg()).restore(
        checkpoint_params.abstract_tree(params, device),
        checkpoint_params.abstract_tree(opt_state, device), iter(dataset()))


def test_a_save_interval_below_one_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="checkpoint.every_steps must be >= 1, got 0"):
    run.Checkpointer(tmp_path / "run", ckpt_cfg(every_steps=0))


def test_relative_run_folder_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # `--workdir runs/x`, as the README's main command gives it
  ckpt = run.Checkpointer("runs/x/checkpoints", _sections.checkpoint_config())
  assert ckpt.save(3, {"w": jnp.arange(4.0)}, {"count": jnp.ones((), jnp.int32)}, force=True)
  ckpt.close()
  device = SingleDeviceSharding(jax.devices()[0])
  restored = run.Checkpointer("runs/x/checkpoints",
                                     _sections.checkpoint_config()).restore(
      {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=device)},
      {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)})
  assert restored.step == 3 and os.path.isdir(tmp_path / "runs/x/checkpoints/3")
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
  # `infllava generate --checkpoint runs/x` reads the params alone, also by a relative path.
  params = checkpoint_params.restore_params_only("runs/x", {"w": jnp.zeros(4)})
  np.testing.assert_array_equal(params["w"], np.arange(4.0))
  assert str(locate.absolute("gs://bucket/run")) == "gs://bucket/run"


def test_restore_onto_other_meshes(tmp_path):
  devices = jax.devices()
  fsdp = sharding.make_mesh("fsdp", devices[:4])
  params = shard(toy_params(), fsdp, ("fsdp", None))
  opt_state = {"mu": shard(jax.tree.map(lambda x: 2 * x, toy_params()), fsdp, ("fsdp", None))}
  with run.Checkpointer(tmp_path, ckpt_cfg()) as ckpt:
    assert ckpt.save(4, params, opt_state)

  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices[4:])
  targets = {
      "2x2": lambda x: NamedSharding(mesh, spec_for(x, ("fsdp", "tensor"))),
      "one device": lambda x: SingleDeviceSharding(devices[7]),
  }
  for name, make in targets.items():
    abstract_params = checkpoint_params.abstract_tree(params, jax.tree.map(make, params))
    abstract_opt = checkpoint_params.abstract_tree(opt_state, jax.tree.map(make, opt_state))
    ckpt = run.Checkpointer(tmp_path, ckpt_cfg())
    out = ckpt.restore(abstract_params, abstract_opt)
    ckpt.close()
    assert_trees_equal(out.params, toy_params())
    assert_trees_equal(out.opt_state["mu"], jax.tree.map(lambda x: 2 * x, toy_params()))
    for got, want in zip(jax.tree.leaves(out.params), jax.tree.leaves(abstract_params)):
      assert got.sharding == want.sharding, name
    kernel = out.params["dem"]["fuse"]["kernel"]
    if name == "2x2":
      assert kernel.addressable_shards[0].data.shape == (4, 2)   # split over both axes
    else:
      assert kernel.sharding.device_set == {devices[7]}


def test_restore_params_only_subset(tmp_path):
  stage1 = toy_params()
  with run.Checkpointer(tmp_path / "stage1", ckpt_cfg()) as ckpt:
    ckpt.save(2, stage1, {"count": jnp.zeros((), jnp.int32)})
    ckpt.save(4, jax.tree.map(lambda x: x + 1, stage1), {"count": jnp.ones((), jnp.int32)})

  fresh = jax.tree.map(jnp.zeros_like, stage1)
  fresh["vision"]["patch_embed"] = fresh["vision"]["patch_embed"].astype(jnp.bfloat16)
  assert locate.read_checkpoint(tmp_path / "stage1", None, lambda f: f)[0] == 4  # the latest
  assert locate.read_checkpoint(tmp_path / "stage1", 2, lambda f: f)[0] == 2
  out = checkpoint_params.restore_params_only(tmp_path / "stage1", fresh,
                                       include=(r"^dem/", r"^projector/"))
  np.testing.assert_array_equal(out["dem"]["fuse"]["kernel"], stage1["dem"]["fuse"]["kernel"] + 1)
  np.testing.assert_array_equal(out["projector"]["fc1"]["kernel"],
                                stage1["projector"]["fc1"]["kernel"] + 1)
  assert not np.any(np.asarray(out["llm"]["lm_head"]["kernel"]))        # kept from target
  assert out["vision"]["patch_embed"].dtype == jnp.bfloat16

  # An older step, all params, cast to the target's dtype and placed in its sharding.
  mesh = sharding.make_mesh("fsdp", jax.devices()[:2])
  target = checkpoint_params.abstract_tree(
      fresh, jax.tree.map(lambda x: NamedSharding(mesh, spec_for(x, ("fsdp", None))), fresh))
  out = checkpoint_params.restore_params_only(tmp_path / "stage1", target, step=2)
  assert out["vision"]["patch_embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["vision"]["patch_embed"],
                                stage1["vision"]["patch_embed"].astype(jnp.bfloat16))
  assert out["llm"]["lm_head"]["kernel"].sharding == target["llm"]["lm_head"]["kernel"].sharding

  with pytest.raises(ValueError, match="matches no param"):
    checkpoint_params.restore_params_only(tmp_path / "stage1", fresh, include=(r"^mm_projector/",))
  bigger = dict(fresh, dem={"fuse": {"kernel": jnp.zeros((9, 4)), "bias": jnp.zeros(4)}})
  with pytest.raises(ValueError, match=r"param dem/fuse/kernel is saved with shape \(8, 4\) "
                                       r"but the config's model has \(9, 4\)"):
    checkpoint_params.restore_params_only(tmp_path / "stage1", bigger, include=(r"^dem/",))
  extra = dict(fresh, dem=dict(fresh["dem"], gate=jnp.zeros(3)))
  with pytest.raises(ValueError, match="dem/gate"):
    checkpoint_params.restore_params_only(tmp_path / "stage1", extra)


def test_loading_a_run_logs_no_warnings(tmp_path, caplog):
  params = toy_params()
  with run.Checkpointer(tmp_path / "run", ckpt_cfg()) as ckpt:
    ckpt.save(2, params, {"count": jnp.zeros((), jnp.int32)})
  with caplog.at_level(logging.WARNING):
    out = checkpoint_params.restore_params_only(tmp_path / "run",
                                                jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_array_equal(out["dem"]["fuse"]["kernel"], params["dem"]["fuse"]["kernel"])
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_restore_params_only_from_converted_folder(tmp_path):
  # The converted format (checkpoints/converted.py): an Orbax PyTree of numpy arrays in
  # DIR/params, no steps.
  params = jax.tree.map(np.asarray, toy_params())
  ocp.PyTreeCheckpointer().save(tmp_path / "converted" / "params", params)
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
  target = checkpoint_params.abstract_tree(
      params, jax.tree.map(lambda x: NamedSharding(mesh, spec_for(x, ("fsdp", "tensor"))),
                           params))
  out = checkpoint_params.restore_params_only(tmp_path / "converted", target, include=(r"^llm/",))
  assert_trees_equal(out["llm"], params["llm"])
  assert out["llm"]["lm_head"]["kernel"].sharding == target["llm"]["lm_head"]["kernel"].sharding
  assert out["dem"]["fuse"]["kernel"] is target["dem"]["fuse"]["kernel"]   # not read
  assert locate.read_checkpoint(tmp_path / "converted", None, lambda f: f)[0] is None
  with pytest.raises(ConfigError, match="not a run: --step 3 cannot apply"):
    checkpoint_params.restore_params_only(tmp_path / "converted", target, step=3)
  with pytest.raises(ConfigError, match="neither model_config.json nor a run config"):
    locate.checkpoint_config(tmp_path / "converted")


def run_script(tmp_path, body, **popen):
  script = tmp_path / "script.py"
  script.write_text(textwrap.dedent(body))
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_kill_during_async_save_leaves_previous_step(tmp_path):
  proc = run_script(tmp_path, """
      import os, signal, sys
      import jax.numpy as jnp
      from infllava_jax.checkpoints import run
      from infllava_jax.presets import _sections
      cfg = _sections.checkpoint_config()
      ckpt = run.Checkpointer(sys.argv[1], cfg)
      small = {"w": jnp.arange(6.0)}
      ckpt.save(1, small, {"count": jnp.ones((), jnp.int32)}, force=True)
      ckpt.wait_until_finished()
      big = {"w": jnp.ones((50 * 1024 * 1024,), jnp.float32)}   # 200 MB
      ckpt.save(2, big, {"count": 2 * jnp.ones((), jnp.int32)}, force=True)
      print("saving", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
      """)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL, err
  assert "saving" in out
  leftovers = [p for p in os.listdir(tmp_path / "run") if p not in ("1",)]
  assert leftovers and all("tmp" in p for p in leftovers), leftovers   # cut mid-save

  ckpt = run.Checkpointer(tmp_path / "run", _sections.checkpoint_config())
  assert ckpt.latest_step() == 1 and list(ckpt.all_steps()) == [1]
  device = SingleDeviceSharding(jax.devices()[0])
  restored = ckpt.restore({"w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=device)},
                          {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)})
  np.testing.assert_array_equal(restored.params["w"], np.arange(6.0))
  assert ckpt.save(2, {"w": jnp.zeros(6)}, {"count": jnp.zeros((), jnp.int32)}, force=True)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "run")) == ["1", "2"]            # tmp folder cleaned


def truncate_largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(100)


def test_restore_newest_sets_a_damaged_step_aside_and_takes_the_one_before(tmp_path, capsys):
  params = {"w": jnp.arange(4096.0)}
  opt_state = {"count": jnp.ones((), jnp.int32)}
  with run.Checkpointer(tmp_path / "run", ckpt_cfg(max_to_keep=None)) as ckpt:
    for step in (2, 4, 6):
      ckpt.save(step, jax.tree.map(lambda x: x + step, params), opt_state, force=True)
  truncate_largest_file(tmp_path / "run" / "6" / "params")
  device = SingleDeviceSharding(jax.devices()[0])
  target = checkpoint_params.abstract_tree(params, device)
  abstract_opt = checkpoint_params.abstract_tree(opt_state, device)
  ckpt = run.Checkpointer(tmp_path / "run", ckpt_cfg(max_to_keep=None))
  with pytest.raises(locate.UnreadableStepError, match=r"/run/6 is unreadable \(OUT_OF_RANGE: "
                                                       r".*\); an older step may read: --step 4"):
    ckpt.restore(target, abstract_opt, step=6)
  restored = ckpt.restore_newest(target, abstract_opt)
  assert restored.step == 4
  np.testing.assert_array_equal(restored.params["w"], np.arange(4096.0) + 4)
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].endswith(
      "; moved to 6.unreadable-out-of-range; using step 4 instead"), err
  assert sorted(os.listdir(tmp_path / "run")) == ["2", "4", "6.unreadable-out-of-range"]
  assert list(ckpt.all_steps()) == [2, 4]
  assert ckpt.save(6, params, opt_state, force=True)  # the step number is free again
  ckpt.close()

  # No step reads: an error naming each, and nothing is moved (a restart must not begin
  # afresh because every step was set aside).
  for step in (2, 4):
    truncate_largest_file(tmp_path / "run" / str(step) / "params")
  truncate_largest_file(tmp_path / "run" / "6" / "params")
  with run.Checkpointer(tmp_path / "run", ckpt_cfg(max_to_keep=None)) as ckpt:
    with pytest.raises(locate.UnreadableStepError,
                       match=r"/run: no checkpoint step reads; step 6: OUT_OF_RANGE: .*; "
                             r"step 4: OUT_OF_RANGE: .*; step 2: OUT_OF_RANGE: "):
      ckpt.restore_newest(target, abstract_opt)
  assert sorted(os.listdir(tmp_path / "run")) == ["2", "4", "6", "6.unreadable-out-of-range"]


def test_restore_newest_sets_nothing_aside_for_a_tree_that_does_not_match(tmp_path):
  """Another optimiser (a tree of another structure) is not a damaged step."""
  params = {"w": jnp.arange(8.0)}
  with run.Checkpointer(tmp_path / "run", ckpt_cfg()) as ckpt:
    ckpt.save(2, params, {"count": jnp.ones((), jnp.int32)}, force=True)
  device = SingleDeviceSharding(jax.devices()[0])
  other_opt = {"mu": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=device)}
  with run.Checkpointer(tmp_path / "run", ckpt_cfg()) as ckpt:
    with pytest.raises(ValueError) as raised:
      ckpt.restore_newest(checkpoint_params.abstract_tree(params, device), other_opt)
  assert not isinstance(raised.value, locate.UnreadableStepError)
  assert sorted(os.listdir(tmp_path / "run")) == ["2"]
