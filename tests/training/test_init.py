"""Starting a run from checkpoints (`--init_base`, `--init_from`), and gradient
accumulation through the Trainer.

The sources are written from random numpy params (no training needed): a converted
checkpoint ("base", the format of `infllava convert from-pytorch`) and a run folder
("stage1", saved by `Checkpointer` at step 7). Every Trainer here starts from a source
that gives all params, so none compiles the random init; only the accumulation test
compiles train steps (two, on one CPU device).
"""

import os
import re

import jax
import numpy as np
import pytest

from infllava_jax.config import load_config
from infllava_jax.checkpoints import converted, init_sources, locate, run
from infllava_jax.training import loop, optim
from tests.random_params import random_params
from tests.training.test_loop import TINY, assert_trees_equal, host

# No warmup: both updates move the params. eps = 1e-4 bounds Adam's sensitivity to a
# near-zero gradient summed in another order (see test_step.py) to lr / eps = 30x its
# difference, so accumulation must agree to ~1e-6, not merely to lr.
OVERRIDES = TINY + ["--config.train.steps=2", "--config.train.eps=1e-4"]


def config_with(overrides=()):
  return load_config("configs/synthetic.py", OVERRIDES + list(overrides))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """(base, stage1): a converted checkpoint and a run folder, their paths and params."""
  root = tmp_path_factory.mktemp("sources")
  config = config_with()
  base, stage1 = (random_params(config.model, seed, std=0.05, unit_scales=False) for seed in (1, 2))
  converted.save_converted(str(root / "base"), config.model, base)
  with run.Checkpointer(root / "stage1" / locate.RUN_CHECKPOINTS,
                       config.checkpoint, config=config) as ckpt:
    ckpt.save(7, stage1, {"count": np.zeros((), np.int32)}, force=True)
  return {"base": (str(root / "base"), base), "stage1": (str(root / "stage1"), stage1)}


def trainer(workdir, init=(), overrides=()):
  return loop.Trainer(config_with(overrides), str(workdir), init=init,
                      devices=jax.devices()[:1])


def test_init_from_converted_is_bit_identical_at_step_0(sources, tmp_path, capsys):
  base_path, base = sources["base"]
  t = trainer(tmp_path, loop.init_sources(None, base_path, None))
  assert t.start_step == 0 and int(t.state.step) == 0
  assert_trees_equal(host(t.state.params), base)
  assert f"init: dem, llm, projector, vision from {base_path} (converted)" in \
      capsys.readouterr().out


def test_stage2_init_takes_dem_and_projector_from_the_run_the_rest_from_base(
    sources, tmp_path, capsys):
  (base_path, base), (run_path, stage1) = sources["base"], sources["stage1"]
  t = trainer(tmp_path, loop.init_sources(base_path, run_path, (r"^dem/", r"^projector/")))
  params = host(t.state.params)
  for group, want in (("dem", stage1), ("projector", stage1), ("llm", base), ("vision", base)):
    assert_trees_equal(params[group], want[group])
  assert (f"init: llm, vision from {base_path} (converted); dem, projector from {run_path} "
          "(step 7)") in capsys.readouterr().out


def test_init_line_names_shares_overridden_sources_and_ignored_params(sources):
  """A source giving part of a group: each place states its share (metadata only)."""
  base_path, base = sources["base"]
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  paths = jax.tree.leaves(optim.param_paths(base))
  plans = init_sources.plan_init(target, [init_sources.InitSource(base_path, (r"^llm/embed/",))])
  n_llm = sum(p.startswith("llm/") for p in paths)
  assert init_sources.describe_init(plans, paths) == (
      f"init: llm (1 of {n_llm} params) from {base_path} (converted); dem, "
      f"llm ({n_llm - 1} of {n_llm} params), projector, vision random init")
  # A source wholly overridden, and params a source holds that the model lacks, are named.
  run_path, _ = sources["stage1"]
  no_dem = {k: v for k, v in target.items() if k != "dem"}
  plans = init_sources.plan_init(no_dem, loop.init_sources(base_path, run_path, None))
  n_dem = len(jax.tree.leaves(base["dem"]))
  assert [len(p.paths) for p in plans] == [0, len(paths) - n_dem]
  assert init_sources.describe_init(plans, [p for p in paths if not p.startswith("dem/")]) == (
      f"init: llm, projector, vision from {run_path} (step 7); nothing from {base_path} "
      f"(converted): later sources give all it would; {n_dem} params of {base_path} "
      f"(converted) not in the model, ignored (e.g. dem/attention/k/bias); {n_dem} params "
      f"of {run_path} (step 7) not in the model, ignored (e.g. dem/attention/k/bias)")


def test_init_errors_name_the_path_the_param_and_the_regex(sources, tmp_path):
  base_path, _ = sources["base"]
  run_path, _ = sources["stage1"]
  nowhere = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=rf"init source {re.escape(nowhere)}: does not exist; expected a run "
                           r"folder .* or a converted checkpoint"):
    trainer(tmp_path / "a", loop.init_sources(nowhere, None, None))
  assert not (tmp_path / "a" / locate.RUN_CHECKPOINTS).exists()  # nothing left behind
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"empty: holds no complete checkpoint step"):
    trainer(tmp_path / "b", loop.init_sources(base_path, str(tmp_path / "empty"), None))
  # The config's LLM is narrower than the checkpoint's: the param and both shapes.
  with pytest.raises(ValueError, match=r"converted\): param llm/layers/mlp/down/kernel is "
                                       r"saved with shape \(1, 128, 64\) but the config's "
                                       r"model has \(1, 96, 64\) \(and 2 more params\)"):
    trainer(tmp_path / "c", loop.init_sources(base_path, None, None),
            ["--config.model.llm.mlp_dim=96"])
  with pytest.raises(ValueError, match=r"step 7\): include regex '\^mm_projector/' matches "
                                       r"no param of the model"):
    trainer(tmp_path / "d", loop.init_sources(base_path, run_path,
                                              (r"^dem/", r"^mm_projector/")))


def test_grad_accumulation_matches_one_batch_and_resume_ignores_init(sources, tmp_path,
                                                                     capsys):
  """Batch 4 in 2 micro-batches vs in one, global token mean: the same 2 updates.

  Only the summation order of the gradients differs, so equality is to 1e-6, not bits.
  Then a third Trainer on the first run's folder resumes it, ignoring its --init_*.
  """
  base_path, _ = sources["base"]
  run_path, _ = sources["stage1"]
  init = loop.init_sources(base_path, None, None)
  mean = ["--config.train.loss_normalisation=global_token_mean"]
  one = trainer(tmp_path / "one", init, mean)
  one.run()
  two = trainer(tmp_path / "two", init, mean + ["--config.train.grad_accum_steps=2"])
  two.run()
  assert int(one.state.step) == int(two.state.step) == 2
  before = sources["base"][1]
  after_one, after_two = host(one.state.params), host(two.state.params)
  assert not np.array_equal(after_one["projector"]["fc1"]["kernel"],
                            before["projector"]["fc1"]["kernel"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after_two)[0],
                          jax.tree.leaves(after_one)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Moments to 1e-5 of each array's largest entry: an entry near zero is a sum that
  # cancels, where a different summation order moves its last bits by more than 1e-5 of
  # itself (CPU dots through Eigen: one first moment of -1.7e-4 moved 3e-9, its array's
  # largest entry being 7.5e-3).
  for a, b in zip(jax.tree.leaves(host(two.state.opt_state)),
                  jax.tree.leaves(host(one.state.opt_state))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b), initial=1e-9))
  losses = [re.findall(r"step \d/2 loss (\S+)", out)
            for out in capsys.readouterr().out.split("training 2 steps")[1:]]
  assert len(losses) == 2 and len(losses[0]) == len(losses[1]) == 2, losses
  np.testing.assert_allclose(np.float64(losses[0]), np.float64(losses[1]), atol=2e-4)

  resumed = trainer(tmp_path / "one", loop.init_sources(None, run_path, (r"^dem/",)), mean)
  assert resumed.start_step == 2
  assert_trees_equal(host(resumed.state.params), after_one)
  assert re.search(r"one has checkpoints: resuming it, --init_\* ignored \(.*stage1\)",
                   capsys.readouterr().out)
