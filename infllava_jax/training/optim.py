"""Optimiser, learning-rate schedule, freeze masks and loss normalisation (docs/fidelity.md#recipe-numbers).

Everything here reads one `train` ConfigDict section (`presets/_sections.train_config
(stage)` gives the reference's values):

  lr                  peak learning rate (stage 1: 1e-3, stage 2: 2e-5).
  warmup_ratio        linear warmup over ceil(warmup_ratio * total_steps) steps, then a
                      half-cycle cosine to 0 (HF `cosine`).
  weight_decay        decoupled AdamW decay (reference: 0).
  weight_decay_exclude  regexes of params never decayed: HF excludes biases and norm
                      weights (ours are named `bias` and `scale`).
  b1, b2, eps         AdamW moments (torch defaults 0.9, 0.999, 1e-8).
  max_grad_norm       None (reference: no clipping, docs/fidelity.md#gradient-clipping) or a global-norm bound
                      taken over the trainable params only.
  grad_accum_steps    micro-batches per optimiser step, accumulated inside one jitted step
                      by `accumulate_gradients` (no `optax.MultiSteps`).
  trainable           regexes over '/'-joined param paths; a param trains when one matches.
                      CLIP (`^vision/`) is frozen unless listed here.
  param_groups        ((regex, lr_multiplier), ...) over trainable params, first match
                      wins, others take 1.0; e.g. ((r"^vision/", 0.1),) with "^vision/"
                      added to `trainable` unfreezes CLIP at a tenth of the peak lr.
  projector_lr        None, or the DEM's and the projector's own peak lr (the reference's
                      mm_projector_lr): a group ahead of `param_groups`, lr multiplier
                      projector_lr / lr.
  lora                LoRA adapters (`lora/provider.py`); when enabled the adapters train,
                      the kernels they sit on are frozen whatever `trainable` says, and the
                      other params follow `trainable`.
  loss_normalisation  "global_token_mean" (default: sum of token losses / supervised tokens
                      of the whole global batch, independent of how it is split) or
                      "micro_batch_mean" (the reference's HF/DeepSpeed behaviour: mean over
                      each group of `loss_group_size` rows, then the mean of those means).
  loss_group_size     rows per reference micro-batch (per-GPU batch: 16 stage 1, 8 stage 2).
  loss_chunk          tokens per chunk of the cross-entropy (`chunked_cross_entropy`): the
                      [B, T, V] float32 logits and their gradient exist one chunk at a time;
                      0 computes them whole.
  loss_vocab_block    0 (default): the loss above, vocabulary-parallel on a mesh. > 0: each
                      device keeps its own rows and gathers lm_head this many vocabulary
                      columns at a time (`blockwise_cross_entropy`; the 8B configs). Needs
                      lm_head's vocabulary unsplit (mesh tensor=1); otherwise the loss above.
  global_batch_size   rows per optimiser step over all processes (256 / 128); each process
                      feeds its share (`loop.host_batch_size`). None: data.batch_size rows
                      per process.
  num_epochs          passes over the data when `steps` is unset (1).

Frozen params get no optimiser state: `optax.multi_transform` routes them to
`optax.set_to_zero()`, whose state is empty, so AdamW moments exist only for trainable leaves.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.lora import params as lora_params, provider as lora
from infllava_jax.model import llama

FROZEN = "frozen"
LOSS_MODES = ("global_token_mean", "micro_batch_mean")
PROJECTOR_PARAMS = r"^(dem|projector)/"  # what train.projector_lr applies to


def learning_rate_schedule(train_cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  """HF `get_cosine_schedule_with_warmup` times `train_cfg.lr`, as a function of the update count.

  Update k (counting from 0, as optax and the HF scheduler both do) gets
  lr * k / W for k < W, else lr * 0.5 * (1 + cos(pi * (k - W) / (total - W))), with
  W = ceil(warmup_ratio * total). Past `total_steps` the lr stays 0 (HF would rise again).
  """
  if total_steps < 1:
    raise ValueError(f"learning_rate_schedule: total_steps must be >= 1, got {total_steps}")
  peak = float(train_cfg.lr)
  warmup = math.ceil(float(train_cfg.warmup_ratio) * total_steps)
  decay = max(1, total_steps - warmup)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = count / max(1, warmup)
    progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return peak * jnp.where(count < warmup, ramp, cosine)

  return schedule


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _join(path) -> str:
  return "/".join(_key_name(k) for k in path)


def param_paths(params: Any) -> Any:
  """The tree of '/'-joined key paths ("llm/layers/attn/q/kernel") matching `params`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _join(path), params)


def _matches_any(path: str, patterns: Sequence[str]) -> bool:
  return any(re.search(p, path) for p in patterns)


def _check_patterns_match(paths: Sequence[str], patterns: Sequence[str], field: str):
  for pattern in patterns:
    if not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"train.{field}: regex {pattern!r} matches no param; "
                       f"top-level names are {sorted({p.split('/')[0] for p in paths})}")


def trainable_mask(params: Any, train_cfg: ConfigDict) -> Any:
  """Tree of bools like `params` (unboxed): True where a `train_cfg.trainable` regex matches;
  with `train_cfg.lora` enabled, True for the adapters and False for the kernels they sit on.

  A regex that matches no param raises, so a typo cannot silently freeze a module.
  """
  paths = param_paths(params)
  _check_patterns_match(jax.tree.leaves(paths), train_cfg.trainable, "trainable")
  if not lora.enabled(train_cfg):
    return jax.tree.map(lambda p: _matches_any(p, train_cfg.trainable), paths)
  if not any(lora_params.is_lora(p) for p in jax.tree.leaves(paths)):
    raise ValueError(f"train.lora: targets {train_cfg.lora.targets!r} gave no adapter")

  def trains(path: str) -> bool:
    if lora_params.is_lora(path):
      return True
    return (not lora.is_target_kernel(path, train_cfg.lora)
            and _matches_any(path, train_cfg.trainable))

  return jax.tree.map(trains, paths)


def param_group_rules(train_cfg: ConfigDict) -> tuple[tuple[str, float], ...]:
  """((regex, lr multiplier), ...): `projector_lr`'s group, if set, then `param_groups`."""
  groups = tuple((pattern, float(m)) for pattern, m in train_cfg.param_groups)
  if train_cfg.get("projector_lr") is not None:
    groups = ((PROJECTOR_PARAMS, float(train_cfg.projector_lr) / float(train_cfg.lr)),) + groups
  return groups


def param_labels(params: Any, train_cfg: ConfigDict) -> Any:
  """Tree of labels like `params`: "frozen", or "group_<i>" (i-th `param_group_rules`
  entry), or "group_default" (lr multiplier 1)."""
  paths = param_paths(params)
  groups = param_group_rules(train_cfg)
  _check_patterns_match(jax.tree.leaves(paths), [g[0] for g in groups], "param_groups")
  mask = trainable_mask(params, train_cfg)

  def label(path: str, trainable: bool) -> str:
    if not trainable:
      return FROZEN
    for i, (pattern, _) in enumerate(groups):
      if re.search(pattern, path):
        return f"group_{i}"
    return "group_default"

  return jax.tree.map(label, paths, mask)


def make_optimizer(train_cfg: ConfigDict, total_steps: int,
                   params: Any) -> optax.GradientTransformation:
  """AdamW with the warmup-cosine schedule, per-group lr multipliers and frozen params.

  `params` (unboxed arrays or ShapeDtypeStructs) only fixes the tree structure and names.
  Gradient accumulation is not inside: the train step sums micro-batch gradients with
  `accumulate_gradients` and calls `update` once per global batch.
  """
  schedule = learning_rate_schedule(train_cfg, total_steps)
  exclude = tuple(train_cfg.weight_decay_exclude)

  def decay_mask(tree):
    # A function of the tree it gets: inside multi_transform, other groups' leaves are
    # empty `MaskedNode`s, so a fixed mask tree would not match.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not _matches_any(_join(path), exclude), tree)

  multipliers = {f"group_{i}": m for i, (_, m) in enumerate(param_group_rules(train_cfg))}
  multipliers["group_default"] = 1.0

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(lambda count: multiplier * schedule(count), b1=train_cfg.b1,
                       b2=train_cfg.b2, eps=train_cfg.eps,
                       weight_decay=train_cfg.weight_decay, mask=decay_mask)

  transforms = {label: adamw(m) for label, m in multipliers.items()}
  transforms[FROZEN] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, param_labels(params, train_cfg))
  if train_cfg.max_grad_norm is not None:
    # Masked, so the norm is taken over trainable grads only.
    clip = optax.masked(optax.clip_by_global_norm(float(train_cfg.max_grad_norm)),
                        trainable_mask(params, train_cfg))
    tx = optax.chain(clip, tx)
  return tx


def per_token_cross_entropy(logits: jax.Array, targets: jax.Array,
                            vocab_split: bool = False) -> jax.Array:
  """Float32 CE of logits [B, T, V] against int32 targets [B, T] -> [B, T].

  vocab_split: the vocabulary axis is split over devices (`loss_vocab`). The target's logit
  is then picked by a masked sum, which partitions into local sums and one all-reduce where
  a gather does not; otherwise by optax's gather, which skips a pass over the logits.
  """
  logits = logits.astype(jnp.float32)
  if not vocab_split:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logits = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                          chunk: int, dtype: Any) -> jax.Array:
  """`per_token_cross_entropy` of the logits `hidden @ kernel`, `chunk` tokens at a time.

  hidden [B, T, D] (the LLM's final-norm output), kernel [D, V] (lm_head), targets [B, T]
  int32 -> [B, T] float32. The logits of one chunk, [B, chunk, V], are made, reduced and
  dropped in a `lax.map`; the backward recomputes them per chunk (`jax.checkpoint`) and sums
  the kernel's gradient over chunks. Whole float32 logits and their gradient would be 1 GiB
  each per row of 2048 tokens at LLaMA-3's V = 128256. T need not divide by `chunk` (the
  last chunk is padded and its padding dropped); chunk <= 0 or >= T computes them whole.

  On a mesh the loss is vocabulary-parallel (`sharding.py`, `loss_*` axes): each chunk's
  hidden states are gathered over `fsdp` inside the loop (never the whole batch's at once)
  and lm_head is re-split by vocabulary once, so no device ever holds the whole lm_head,
  only [B, chunk, V / (fsdp * tensor)] of each chunk's logits.
  """
  b, t, d = hidden.shape
  # Cast before the re-split: float32 params (stage 2) move and hold half the bytes.
  kernel = nn.with_logical_constraint(kernel.astype(dtype), ("act_embed", "loss_vocab"))
  vocab_split = sharding.logical_axis_size("loss_vocab") > 1

  def chunk_loss(h, y):
    h = nn.with_logical_constraint(h, ("loss_batch", "length", "act_embed"))
    logits = llama.project_to_vocab(h, kernel, dtype, ("loss_batch", "length", "loss_vocab"))
    return per_token_cross_entropy(logits, y, vocab_split)

  if chunk <= 0 or t <= chunk:
    return chunk_loss(hidden, targets)
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  h = nn.with_logical_constraint(h, (None, "batch", "length", "act_embed"))  # still per device
  y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  ce = jax.lax.map(jax.checkpoint(lambda hy: chunk_loss(*hy)), (h, y))  # [n, B, chunk]
  return ce.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def blockwise_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                            block: int, dtype: Any) -> jax.Array:
  """`per_token_cross_entropy` of the logits `hidden @ kernel`, `block` vocabulary columns
  at a time, each device on its own rows.

  hidden [B, T, D] (the LLM's final-norm output), kernel [D, V] (lm_head, rows split over
  `fsdp` as stored), targets [B, T] int32 -> [B, T] float32. A scan over the column blocks
  keeps a running max, sum of exponentials and target logit per token (online
  log-sum-exp); its body is checkpointed, so the backward recomputes one block's
  [B, T, block] float32 logits at a time. On a mesh each block of lm_head is gathered over
  `fsdp` inside the loop ([D, block], never the whole kernel) while the hidden states stay
  where they are: unlike `chunked_cross_entropy`'s vocabulary-parallel form, no re-split
  copy of lm_head is made (docs/performance.md#what-lowered-the-peak),
  at the price of gathering every device's share of lm_head once forwards and once in the
  backward. When `block` does not divide V the last block overlaps the one before; the
  columns already counted are masked there.
  """
  v = kernel.shape[1]
  block = min(block, v)
  h = nn.with_logical_constraint(hidden.astype(dtype), ("batch", "length", "act_embed"))

  def add_block(carry, i):
    top, total, picked = carry
    start = jnp.minimum(i * block, v - block)
    # No constraint on the block itself: one there makes XLA gather the whole kernel
    # before the loop and slice it inside. Keeping the logits on the rows' devices makes
    # the product gather the block instead.
    w = jax.lax.dynamic_slice_in_dim(kernel, start, block, axis=1).astype(dtype)
    logits = nn.with_logical_constraint(
        jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32),
        ("batch", "length", "act_vocab"))
    ids = start + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
    fresh = ids >= i * block
    logits = jnp.where(fresh, logits, -jnp.inf)
    new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
    total = (total * jnp.exp(top - new_top)
             + jnp.sum(jnp.exp(logits - new_top[..., None]), axis=-1))
    hit = fresh & (ids == targets[..., None])
    picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return (new_top, total, picked), None

  shape = targets.shape
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32))
  (top, total, picked), _ = jax.lax.scan(jax.checkpoint(add_block), init,
                                         jnp.arange(-(-v // block)))
  return top + jnp.log(total) - picked


def vocab_block(train_cfg: ConfigDict, vocab_shards: int) -> int:
  """The vocabulary block the loss runs with (`token_cross_entropy`): `loss_vocab_block`
  where each device holds lm_head's whole vocabulary (vocab_shards == 1), else 0, the
  vocabulary-parallel `chunked_cross_entropy`."""
  return train_cfg.get("loss_vocab_block", 0) if vocab_shards == 1 else 0


def token_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                        train_cfg: ConfigDict, dtype: Any) -> jax.Array:
  """[B, T] float32 CE of `hidden @ kernel` by the form `train_cfg` picks (`loss_chunk`,
  `loss_vocab_block`; see the module docstring) for the mesh in context."""
  block = vocab_block(train_cfg, sharding.logical_axis_size("vocab"))
  if block > 0:
    return blockwise_cross_entropy(hidden, kernel, targets, block, dtype)
  return chunked_cross_entropy(hidden, kernel, targets, train_cfg.get("loss_chunk", 0), dtype)


def loss_weights(loss_mask: jax.Array, mode: str = "global_token_mean",
                 group_size: int | None = None) -> jax.Array:
  """Per-token weights [B, T] such that sum(ce * weights) is the normalised batch loss.

  Computed once on the whole global batch, before it is split into micro-batches: every
  micro-batch's `sum(ce * w)` is then its exact share, and the accumulated sum over
  micro-batches is the full loss in either mode.

  global_token_mean: w = mask / (supervised tokens in the batch).
  micro_batch_mean:  rows are cut into groups of `group_size` (the reference's per-GPU
    micro-batch); w = mask / (supervised tokens in the group) / (number of groups). A
    group with no supervised token contributes 0 (the reference would give NaN).

  Args:
    loss_mask: [B, T] float32, 1 where the token is supervised.
  """
  loss_mask = loss_mask.astype(jnp.float32)
  if mode == "global_token_mean":
    return loss_mask / jnp.maximum(loss_mask.sum(), 1.0)
  if mode == "micro_batch_mean":
    rows, length = loss_mask.shape
    if group_size is None or group_size < 1 or rows % group_size:
      raise ValueError(f"loss_weights: micro_batch_mean needs a group_size dividing the "
                       f"batch of {rows} rows, got {group_size!r}")
    groups = loss_mask.reshape(rows // group_size, group_size, length)
    counts = jnp.maximum(groups.sum(axis=(1, 2), keepdims=True), 1.0)
    return (groups / counts / groups.shape[0]).reshape(rows, length)
  raise ValueError(f"loss_weights: mode must be one of {LOSS_MODES}, got {mode!r}")


def token_mean_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    mode: str = "global_token_mean",
                    group_size: int | None = None) -> jax.Array:
  """Normalised CE of a whole batch (no accumulation): logits [B, T, V], targets [B, T]."""
  weights = loss_weights(loss_mask, mode, group_size)
  return jnp.sum(per_token_cross_entropy(logits, targets) * weights)


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
  """Leaves [B, ...] -> [A, B / A, ...], micro-batch a taking rows a, a + A, a + 2A, ...

  Strided rather than contiguous rows: with the batch axis sharded over devices, each
  device's block holds rows of every micro-batch, so each micro-batch stays spread over
  all devices without moving data.
  """

  def split(x):
    rows = x.shape[0]
    if rows % num_micro_batches:
      raise ValueError(f"split_micro_batches: batch of {rows} rows does not split into "
                       f"{num_micro_batches} micro-batches")
    x = x.reshape(rows // num_micro_batches, num_micro_batches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], params: Any,
                         batch: Any, num_micro_batches: int) -> tuple[jax.Array, Any, Any]:
  """Sums loss, aux and grads of `loss_fn` over micro-batches with `lax.scan` (inside jit).

  `loss_fn(params, micro_batch) -> (loss, aux)` must return the micro-batch's share of the
  total loss (e.g. `sum(ce * w)` with `w` from `loss_weights` on the global batch, carried
  in the batch), so that sums are the full-batch values. `aux` is a pytree of arrays, also
  summed. With one micro-batch this is plain `value_and_grad`.

  Returns (loss, aux, grads), grads in the params' dtype.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro_batches == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, aux, grads

  micro = split_micro_batches(batch, num_micro_batches)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, aux_shape), _ = jax.eval_shape(grad_fn, params, first)

  def body(carry, micro_batch):
    loss_sum, aux_sum, grad_sum = carry
    (loss, aux), grads = grad_fn(params, micro_batch)
    return (loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux),
            jax.tree.map(jnp.add, grad_sum, grads)), None

  init = (jnp.zeros((), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
          jax.tree.map(jnp.zeros_like, params))
  (loss, aux, grads), _ = jax.lax.scan(body, init, micro)
  return loss, aux, grads
