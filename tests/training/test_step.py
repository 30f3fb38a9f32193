"""The jitted train step: frozen params stay put, and sharding does not change the maths.

Steps are built by `Trainer` (the code a run uses) on a depth-1 tiny model; each test
compiles one or two steps, so the model is kept as small as the config allows.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infllava_jax import sharding
from infllava_jax.config import load_config
from infllava_jax.training import compile as compile_cli
from infllava_jax.training import loop, optim
from infllava_jax.training import state as state_lib

TINY = ["--config.model.vision.depth=1", "--config.model.llm.depth=1",
        "--config.data.synthetic.num_train=32", "--config.data.batch_size=8",
        "--config.data.read_threads=1", "--config.train.steps=10",
        # No warmup: the first update must move the params (warmup starts the lr at 0).
        "--config.train.warmup_ratio=0.0", "--config.train.lr=1e-3",
        "--config.eval.heldout_examples=0"]


def trainer(tmp_path, name, overrides=(), devices=None):
  config = load_config("configs/synthetic.py", TINY + list(overrides))
  return loop.Trainer(config, str(tmp_path / name), devices=devices)


def host(tree):
  return jax.tree.map(np.asarray, tree)


def take_steps(t, batches):
  """Runs `t`'s compiled step on host batches; returns (metrics per step, final params)."""
  metrics = []
  for batch in batches:
    t.state, m = t.step_fn(t.state, loop.global_batch_from_host(batch, t.mesh, t.setup.rules))
    metrics.append({k: float(v) for k, v in m.items()})
  return metrics, host(t.state.params)


def test_stage1_mask_freezes_vision_and_llm(tmp_path):
  t = trainer(tmp_path, "stage1", ["--config.train.trainable=('^dem/', '^projector/')"])
  paths = jax.tree.leaves(optim.param_paths(t.state.params))
  before = host(t.state.params)
  _, after = take_steps(t, [next(t.data), next(t.data)])

  frozen = [p.split("/")[0] for p, m in zip(paths, jax.tree.leaves(t.mask)) if not m]
  assert set(frozen) == {"vision", "llm"}
  for path, m, b, a in zip(paths, jax.tree.leaves(t.mask), jax.tree.leaves(before),
                           jax.tree.leaves(after)):
    if m:
      assert not np.array_equal(a, b), f"trainable {path} did not change"
    else:
      assert np.array_equal(a, b), f"frozen {path} changed"
  # AdamW moments only for trainable leaves: mu + nu = 2x their size, plus scalar counts.
  trainable_size = sum(x.size for x, m in zip(jax.tree.leaves(before), jax.tree.leaves(t.mask))
                       if m)
  opt_leaves = jax.tree_util.tree_flatten_with_path(t.state.opt_state)[0]
  assert sum(x.size for _, x in opt_leaves if x.ndim) == 2 * trainable_size
  names = [jax.tree_util.keystr(p) for p, _ in opt_leaves]
  assert not [n for n in names if "['vision']" in n or "['llm']" in n]
  assert int(t.state.step) == 2


def test_sharded_step_equals_one_device(tmp_path):
  """data=2,fsdp=2,tensor=2 over 8 devices vs one device: same init, batch and optimiser.
  The vocabulary is odd, as LLaMA-3's 128,257 rows are: `tensor` moves off its axis.

  Adam's update g / (sqrt(v) + eps) is nearly sign(g) for |g| << eps, so a gradient near
  zero that rounds differently (a different reduction order) could move a param by up to
  lr: eps = 1e-4 bounds that sensitivity to lr / eps = 100 x the gradient difference,
  while typical grads (~1e-2) still get updates ~lr = 1e-2, far above the 1e-5 tolerance.
  """
  common = ["--config.train.lr=1e-2", "--config.train.eps=1e-4",
            "--config.model.llm.vocab_size=513"]
  sharded = trainer(tmp_path, "sharded", ["--config.mesh=data=2,fsdp=2,tensor=2"] + common)
  single = trainer(tmp_path, "single", common, devices=jax.devices()[:1])
  assert len(sharded.mesh.devices.flat) == 8 and len(single.mesh.devices.flat) == 1
  # Params are sharded over fsdp and tensor, not only replicated.
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded.state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  llm = sharded.state.params["llm"]
  assert llm["embed"]["embedding"].sharding.spec == P(None, ("fsdp", "tensor"))
  assert llm["lm_head"]["kernel"].sharding.spec == P(("fsdp", "tensor"), None)
  # The same seed gives the same init whatever the sharding (partitionable threefry).
  jax.tree.map(np.testing.assert_array_equal, host(sharded.state.params),
               host(single.state.params))
  batches = [next(sharded.data), next(sharded.data)]
  m8, p8 = take_steps(sharded, batches)
  m1, p1 = take_steps(single, batches)
  for a, b in zip(m8, m1):
    for name in ("loss", "grad_norm", "tokens", "lr"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert m1[1]["loss"] != m1[0]["loss"]
  for path, a, b in zip(jax.tree.leaves(optim.param_paths(p1)), jax.tree.leaves(p8),
                        jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=path)


def without_tensor(axes):
  """`axes` (a rule's mesh axes) with `tensor` left out."""
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != "tensor")
  return kept[0] if len(kept) == 1 else kept or None


def test_config_rules_move_params_not_the_maths(tmp_path):
  """`config.sharding.rules` with tensor parallelism for the MLPs only (heads, vocabulary
  and the loss replicated over `tensor`) vs the default table, on fsdp=4 x tensor=2: the
  params lie elsewhere, two steps give the same numbers (see the test above for eps)."""
  mlp_only = tuple((name, axes if "mlp" in name else without_tensor(axes))
                   for name, axes in sharding.LOGICAL_AXIS_RULES)
  common = ["--config.mesh=fsdp=4,tensor=2", "--config.train.lr=1e-2",
            "--config.train.eps=1e-4"]
  default = trainer(tmp_path, "default", common)
  tp_mlp = trainer(tmp_path, "tp_mlp", common + [f"--config.sharding.rules={mlp_only!r}"])
  assert tp_mlp.setup.rules == mlp_only and default.setup.rules == sharding.LOGICAL_AXIS_RULES
  for t, attention in ((default, P(None, "fsdp", "tensor")), (tp_mlp, P(None, "fsdp", None))):
    layer = t.state.params["llm"]["layers"]  # [layers, in, out] kernels
    assert layer["attn"]["q"]["kernel"].sharding.spec == attention
    assert layer["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    # The AdamW moments follow the params, whatever the rules.
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(t.state.opt_state)
               if jax.tree_util.keystr(path).endswith("['llm']['layers']['attn']['q']['kernel']")]
    assert len(moments) == 2 and all(x.sharding.spec == attention for x in moments)
  batches = [next(default.data), next(default.data)]
  m0, p0 = take_steps(default, batches)
  m1, p1 = take_steps(tp_mlp, batches)
  for a, b in zip(m1, m0):
    for name in ("loss", "grad_norm", "tokens", "lr"):
      np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for path, a, b in zip(jax.tree.leaves(optim.param_paths(p0)), jax.tree.leaves(p1),
                        jax.tree.leaves(p0)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=path)


def test_the_step_constrains_activations_by_its_rules():
  """The same state and batch shardings, two rule tables: the traced step differs (its
  activation and loss constraints follow the rules it is given, not a global table)."""
  config = load_config("configs/synthetic.py", TINY + ["--config.mesh=fsdp=4,tensor=2"])
  mesh = sharding.make_mesh(config.mesh)
  setup = state_lib.train_setup(config, mesh, total_steps=10)
  mlp_only = tuple((name, axes if "mlp" in name else without_tensor(axes))
                   for name, axes in sharding.LOGICAL_AXIS_RULES)
  batch = compile_cli.abstract_batch(config, mesh, setup.rules, 8, config.data.max_length)
  texts = []
  for rules in (setup.rules, mlp_only, setup.rules):
    with jax.set_mesh(mesh):
      texts.append(state_lib.jit_train_step(setup._replace(rules=rules), config.train)
                   .lower(setup.abstract, batch).as_text())
  assert texts[0] != texts[1]
  assert texts[0] == texts[2]  # lowering is deterministic: the difference is the rules'


def test_chunked_loss_step_equals_whole_logits_step(tmp_path):
  """train.loss_chunk and train.loss_vocab_block change when logits exist, not the maths:
  7-token chunks (rows of the synthetic batch are not a multiple of 7), and vocabulary
  blocks of 100 (not dividing the vocabulary), vs whole logits, two steps, stage 2."""
  adam = ["--config.train.lr=1e-2", "--config.train.eps=1e-4"]  # see the test above
  devices = jax.devices()[:1]
  whole = trainer(tmp_path, "whole", ["--config.train.loss_chunk=0"] + adam, devices)
  batches = [next(whole.data), next(whole.data)]
  assert batches[0]["tokens"].shape[1] % 7
  assert whole.config.model.llm.vocab_size % 100
  m0, p0 = take_steps(whole, batches)
  for name, flag in (("chunked", "--config.train.loss_chunk=7"),
                     ("blocks", "--config.train.loss_vocab_block=100")):
    m1, p1 = take_steps(trainer(tmp_path, name, [flag] + adam, devices), batches)
    for a, b in zip(m1, m0):
      for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=f"{name} {key}")
    for path, a, b in zip(jax.tree.leaves(optim.param_paths(p0)), jax.tree.leaves(p1),
                          jax.tree.leaves(p0)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"{name} {path}")


if __name__ == "__main__":
  pytest.main([__file__, "-q"])
