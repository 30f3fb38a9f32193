"""Optimiser, schedule, freeze masks and loss normalisation against HF/torch and by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from infllava_jax.presets import _sections
from infllava_jax import sharding
from infllava_jax.model import llama
from infllava_jax.training import optim


def toy_params(seed=0):
  """A param tree shaped like the model's: vision, dem, projector, llm (scanned layers)."""
  rng = np.random.default_rng(seed)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
      "vision": {"patch_embed": arr(6, 8), "layers": {"mlp": {"kernel": arr(2, 8, 8)}}},
      "dem": {"fuse": {"kernel": arr(8, 4), "bias": arr(4)}},
      "projector": {"fc1": {"kernel": arr(8, 16)}, "norm": {"scale": arr(16)}},
      "llm": {"embed": {"embedding": arr(10, 16)},
              "layers": {"attn": {"q": {"kernel": arr(2, 16, 16)}}},
              "final_norm": {"scale": arr(16)},
              "lm_head": {"kernel": arr(16, 10)}},
  }


def config(stage=1, **overrides):
  cfg = _sections.train_config(stage)
  cfg.update(overrides)
  return cfg


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_default_config_matches_reference():
  one, two = _sections.train_config(1), _sections.train_config(2)
  assert (one.lr, two.lr) == (1e-3, 2e-5)
  assert (one.global_batch_size, two.global_batch_size) == (256, 128)
  assert one.max_grad_norm is None and one.weight_decay == 0.0
  assert r"^llm/" in two.trainable and r"^llm/" not in one.trainable
  with pytest.raises(ValueError, match="stage"):
    _sections.train_config(3)


@pytest.mark.parametrize("total", [100, 2180, 7])
def test_schedule_matches_hf_cosine_with_warmup(total):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = config(1)
  warmup = math.ceil(cfg.warmup_ratio * total)
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
  hf = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
  expected = []
  for _ in range(total):
    expected.append(opt.param_groups[0]["lr"])
    opt.step()
    hf.step()
  schedule = optim.learning_rate_schedule(cfg, total)
  got = np.asarray(jax.vmap(schedule)(jnp.arange(total)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-10)
  assert got[0] == 0.0 and float(schedule(total)) == 0.0 and float(schedule(total + 5)) == 0.0
  if total == 2180:
    assert warmup == 66 and got[66] == pytest.approx(cfg.lr)


def test_adamw_matches_torch_adamw_with_hf_schedule():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  total, steps = 20, 6
  cfg = config(2, lr=1e-2, weight_decay=0.1, weight_decay_exclude=(), warmup_ratio=0.1)
  params = {"dem": {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)},
            "projector": {"b": jnp.arange(5, dtype=jnp.float32) / 5},
            "llm": {"x": jnp.ones((2,), jnp.float32)}}
  grads_seq = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1) + i), params)
               for i in range(steps)]

  tparams = {k: torch.nn.Parameter(torch.tensor(np.asarray(v)))
             for k, v in jax.tree_util.tree_leaves_with_path(params)}
  opt = torch.optim.AdamW(tparams.values(), lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                          weight_decay=cfg.weight_decay)
  sched = transformers.get_cosine_schedule_with_warmup(opt, 2, total)
  for grads in grads_seq:
    for (path, g) in jax.tree_util.tree_leaves_with_path(grads):
      tparams[path].grad = torch.tensor(np.asarray(g))
    opt.step()
    sched.step()

  tx = optim.make_optimizer(cfg, total, params)
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    np.testing.assert_allclose(np.asarray(p), tparams[path].detach().numpy(), rtol=1e-5,
                               atol=1e-7, err_msg=str(path))


def test_trainable_mask_stage1_and_stage2():
  params = toy_params()
  one = optim.trainable_mask(params, config(1))
  two = optim.trainable_mask(params, config(2))
  assert jax.tree.leaves(one["dem"]) == [True, True]
  assert all(jax.tree.leaves(one["projector"]))
  assert not any(jax.tree.leaves(one["llm"])) and not any(jax.tree.leaves(one["vision"]))
  assert all(jax.tree.leaves(two["llm"])) and not any(jax.tree.leaves(two["vision"]))
  with pytest.raises(ValueError, match=r"train.trainable.*\^projektor/"):
    optim.trainable_mask(params, config(1, trainable=(r"^projektor/",)))


def test_frozen_params_get_no_optimizer_state_and_do_not_move():
  params = toy_params()
  tx = optim.make_optimizer(config(1, warmup_ratio=0.0), 10, params)
  state = tx.init(params)
  trainable = nbytes(params["dem"]) + nbytes(params["projector"])
  moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  scalars = [x for x in jax.tree.leaves(state) if x.ndim == 0]
  # Two float32 moments per trainable leaf and a few step counters: nothing for the rest.
  assert nbytes(moments) == 2 * trainable
  assert nbytes(scalars) <= 16
  everything = optim.make_optimizer(
      config(1, trainable=(r"^vision/", r"^dem/", r"^projector/", r"^llm/")), 10, params)
  assert nbytes(everything.init(params)) >= 2 * nbytes(params) > 4 * trainable

  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  for name in ("vision", "llm"):
    assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates[name])), name
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates["dem"]))


def test_param_groups_scale_the_learning_rate():
  params = toy_params()
  cfg = config(1, warmup_ratio=0.0, trainable=(r"^dem/", r"^projector/", r"^vision/"),
               param_groups=((r"^vision/", 0.1),))
  labels = optim.param_labels(params, cfg)
  assert set(jax.tree.leaves(labels["vision"])) == {"group_0"}
  assert set(jax.tree.leaves(labels["dem"])) == {"group_default"}
  tx = optim.make_optimizer(cfg, 10, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * g / (|g| + eps): the lr itself, up to eps.
  np.testing.assert_allclose(updates["dem"]["fuse"]["kernel"], -cfg.lr, rtol=1e-5)
  np.testing.assert_allclose(updates["vision"]["patch_embed"], -0.1 * cfg.lr, rtol=1e-5)
  with pytest.raises(ValueError, match="param_groups"):
    optim.param_labels(params, config(1, param_groups=((r"^clip/", 0.1),)))


def test_weight_decay_skips_bias_and_norm_scale():
  params = toy_params()
  cfg = config(1, warmup_ratio=0.0, weight_decay=0.5)
  tx = optim.make_optimizer(cfg, 10, params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # With zero grads, only the decay term -lr * wd * p remains.
  np.testing.assert_allclose(updates["dem"]["fuse"]["kernel"],
                             -cfg.lr * 0.5 * params["dem"]["fuse"]["kernel"], rtol=1e-6)
  assert not np.any(np.asarray(updates["dem"]["fuse"]["bias"]))
  assert not np.any(np.asarray(updates["projector"]["norm"]["scale"]))


def test_clipping_uses_trainable_grads_only():
  params = toy_params()
  # A large eps makes Adam's step depend on the gradient's scale, so clipping shows.
  cfg = config(1, warmup_ratio=0.0, eps=1.0, max_grad_norm=1.0)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["vision"] = jax.tree.map(lambda g: 1e6 * g, grads["vision"])
  tx = optim.make_optimizer(cfg, 10, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = optax.tree.norm({"d": grads["dem"], "p": grads["projector"]})
  g = 1.0 / float(norm)   # each trainable grad after clipping
  b1c, b2c = 1 - cfg.b1, 1 - cfg.b2
  expected = -cfg.lr * (g * b1c / b1c) / (math.sqrt(g * g * b2c / b2c) + 1.0)
  np.testing.assert_allclose(updates["dem"]["fuse"]["kernel"], expected, rtol=1e-5)
  unclipped = optim.make_optimizer(config(1, warmup_ratio=0.0, eps=1.0), 10, params)
  raw, _ = unclipped.update(grads, unclipped.init(params), params)
  np.testing.assert_allclose(raw["dem"]["fuse"]["kernel"], -cfg.lr * 0.5, rtol=1e-5)


def lm_batch(rows=8, length=5, vocab=7, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(rows, length, vocab)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, size=(rows, length)), jnp.int32)
  mask = (rng.random((rows, length)) < 0.6).astype(np.float32)
  mask[1] = 0.0                    # a row with no supervised token
  return logits, targets, jnp.asarray(mask)


def test_token_mean_loss_both_modes_by_hand():
  logits, targets, mask = lm_batch()
  logp = np.asarray(jax.nn.log_softmax(logits))
  ce = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(optim.per_token_cross_entropy(logits, targets), ce, rtol=1e-5)
  m = np.asarray(mask)
  global_mean = optim.token_mean_loss(logits, targets, mask)
  np.testing.assert_allclose(global_mean, (ce * m).sum() / m.sum(), rtol=1e-5)
  per_group = [(ce[i:i + 2] * m[i:i + 2]).sum() / m[i:i + 2].sum() for i in range(0, 8, 2)]
  micro = optim.token_mean_loss(logits, targets, mask, "micro_batch_mean", group_size=2)
  np.testing.assert_allclose(micro, np.mean(per_group), rtol=1e-5)
  assert abs(float(micro) - float(global_mean)) > 1e-4   # the modes differ here
  with pytest.raises(ValueError, match="group_size"):
    optim.loss_weights(mask, "micro_batch_mean", group_size=3)
  with pytest.raises(ValueError, match="mode"):
    optim.loss_weights(mask, "token_mean")


@pytest.mark.parametrize("mode", ["global_token_mean", "micro_batch_mean"])
def test_accumulated_gradients_equal_full_batch_on_a_sharded_batch(mode):
  rows, length, width, vocab = 16, 4, 6, 7
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)}
  inputs = jnp.asarray(rng.normal(size=(rows, length, width)), jnp.float32)
  _, targets, mask = lm_batch(rows, length, vocab, seed=2)
  weights = optim.loss_weights(mask, mode, group_size=4)
  batch = {"x": inputs, "targets": targets, "weights": weights}

  def loss_fn(p, b):
    ce = optim.per_token_cross_entropy(b["x"] @ p["w"], b["targets"])
    loss = jnp.sum(ce * b["weights"])
    return loss, {"tokens": jnp.sum(b["weights"] > 0)}

  mesh = sharding.make_mesh("fsdp")
  batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  step = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  full_loss, full_aux, full_grads = step(loss_fn, params, batch, 1)
  loss, aux, grads = step(loss_fn, params, batch, 2)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  np.testing.assert_allclose(grads["w"], full_grads["w"], rtol=1e-5, atol=1e-7)
  assert int(aux["tokens"]) == int(full_aux["tokens"]) == int(np.sum(np.asarray(mask) > 0))
  expected = optim.token_mean_loss(inputs @ params["w"], targets, mask, mode, group_size=4)
  np.testing.assert_allclose(full_loss, expected, rtol=1e-6)


def test_split_micro_batches_is_strided():
  x = jnp.arange(12).reshape(6, 2)
  micro = optim.split_micro_batches(x, 3)
  assert micro.shape == (3, 2, 2)
  np.testing.assert_array_equal(micro[1], [[2, 3], [8, 9]])
  with pytest.raises(ValueError, match="6 rows"):
    optim.split_micro_batches(x, 4)


@pytest.mark.parametrize("form, size", [
    ("chunks", 0), ("chunks", 4), ("chunks", 5), ("chunks", 12),
    ("blocks", 8), ("blocks", 33), ("blocks", 64)])
def test_loss_forms_and_their_gradients_equal_whole_logits(form, size):
  """`chunked_cross_entropy`: token chunks that divide T (4), that do not (5: a padded last
  chunk), and T itself / 0 (whole). `blockwise_cross_entropy`: vocabulary blocks that do
  not divide V (8: the last block overlaps its neighbour, and a target sits in the
  overlap), V itself, and more than V."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 33)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 33, size=(2, 12)), jnp.int32).at[0, 3].set(30)
  weights = jnp.asarray(rng.random(size=(2, 12)), jnp.float32)

  def whole(h, k):
    return optim.per_token_cross_entropy(llama.project_to_vocab(h, k, jnp.float32), targets)

  def in_parts(h, k):
    loss = optim.chunked_cross_entropy if form == "chunks" else optim.blockwise_cross_entropy
    return loss(h, k, targets, size, jnp.float32)

  np.testing.assert_allclose(in_parts(hidden, kernel), whole(hidden, kernel), rtol=1e-6,
                             atol=1e-6)
  grads = [jax.grad(lambda h, k, f=f: jnp.sum(f(h, k) * weights), argnums=(0, 1))(hidden, kernel)
           for f in (in_parts, whole)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(grads[1][1]))) > 1e-3


def test_chunked_cross_entropy_never_holds_whole_logits():
  """XLA's temporaries for loss + gradients: whole [B, T, V] float32 logits (and their
  gradient) vs one [B, chunk, V] chunk at a time."""
  b, t, d, v, chunk = 1, 512, 64, 8192, 64
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(c):
    loss = lambda h, k, y: jnp.sum(optim.chunked_cross_entropy(h, k, y, c, jnp.float32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(hidden, kernel, targets).compile().memory_analysis().temp_size_in_bytes

  logits_bytes, chunk_bytes, kernel_bytes = b * t * v * 4, b * chunk * v * 4, d * v * 4
  assert temp_bytes(0) >= 2 * logits_bytes  # the logits and their gradient
  # One chunk's logits and their gradient, and the kernel gradient summed over chunks.
  assert temp_bytes(chunk) <= 2 * chunk_bytes + kernel_bytes


@pytest.mark.parametrize("form", ["chunks", "blocks"])
def test_loss_forms_never_gather_the_whole_kernel_over_fsdp(form):
  """On fsdp=8 with lm_head split by rows (its param sharding), no device gathers the whole
  kernel, with and without its gradient: XLA's temporaries stay under half of it (a gathered
  kernel, as before the `loss_*` axes, measured 10-17 MiB here against 3.1 MiB). The
  vocabulary-parallel chunks re-split it by vocabulary; the blocks gather [D, block] pieces
  while each device keeps its rows. Values equal one device."""
  b, t, d, v = 8, 64, 64, 32768
  mesh = sharding.make_mesh("fsdp")
  rows = NamedSharding(mesh, PartitionSpec("fsdp"))
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  kernel = rng.normal(size=(d, v)).astype(np.float32) * 0.1
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)

  def loss(h, k, y):
    if form == "chunks":
      return jnp.sum(optim.chunked_cross_entropy(h, k, y, 8, jnp.float32))
    return jnp.sum(optim.blockwise_cross_entropy(h, k, y, 1024, jnp.float32))

  want = jax.grad(loss, argnums=(0, 1))(hidden, kernel, targets)
  assert sharding.logical_axis_size("loss_vocab") == 1
  with jax.set_mesh(mesh), sharding.axis_rules():
    assert sharding.logical_axis_size("loss_vocab") == 8  # the masked-sum target logit
  for argnums in [(0,), (0, 1)]:  # stage 1 (lm_head frozen) and stage 2
    with jax.set_mesh(mesh), sharding.axis_rules():
      grad = jax.jit(jax.grad(loss, argnums=argnums))
      args = [jax.device_put(x, rows) for x in (hidden, kernel, targets)]
      temp = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
      got = grad(*args)
    assert temp < kernel.nbytes / 2, (argnums, temp)
    for i, g in zip(argnums, got):
      np.testing.assert_allclose(g, want[i], rtol=1e-5, atol=1e-6)


def test_token_cross_entropy_takes_blocks_only_where_the_vocabulary_is_whole(monkeypatch):
  """train.loss_vocab_block > 0 picks the blockwise form, except on a mesh that splits
  lm_head's vocabulary (tensor > 1), where the vocabulary-parallel form runs instead."""
  called = []
  real = optim.blockwise_cross_entropy
  monkeypatch.setattr(optim, "blockwise_cross_entropy",
                      lambda *args: called.append(1) or real(*args))
  train = _sections.train_config(2)
  train.loss_vocab_block = 16
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(8, 4, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 40)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, size=(8, 4)), jnp.int32)
  want = optim.per_token_cross_entropy(llama.project_to_vocab(hidden, kernel, jnp.float32),
                                       targets)
  for mesh, blockwise in (("fsdp=8", True), ("fsdp=4,tensor=2", False)):
    called.clear()
    with jax.set_mesh(sharding.make_mesh(mesh)), sharding.axis_rules():
      got = jax.jit(lambda h, k, y: optim.token_cross_entropy(h, k, y, train, jnp.float32))(
          hidden, kernel, targets)
    assert bool(called) == blockwise, mesh
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_token_cross_entropy_gather_and_masked_sum_agree():
  """The two ways of picking the target logit (gather on one device, masked sum when the
  vocabulary is split): the same losses and gradients."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 33)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 33, size=(2, 5)), jnp.int32)
  results = [jax.value_and_grad(lambda x, s=split: jnp.sum(
      optim.per_token_cross_entropy(x, targets, s) * jnp.arange(5.0)))(logits)
             for split in (False, True)]
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-6)
