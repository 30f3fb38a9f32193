"""One jit-compiled, sharded training step: accumulate micro-batch gradients, update AdamW.

Only trainable params are differentiated: the frozen ones (CLIP always; the LLM in stage 1)
are closed over as constants, so XLA neither runs the backward pass into them nor carries
gradient buffers for them through the accumulation scan. The optimiser still sees the
full tree, with zeros for frozen leaves that its `set_to_zero` branch ignores (and XLA
removes, since nothing reads them); updates are applied to the trainable leaves only, so a
frozen param (a quantised LoRA base among them) passes through the step as it is.

With LoRA dropout (`train.lora.dropout`) each row gets its own dropout rng, folded from
`train.seed` and the step, so micro-batches and steps draw different masks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.lora import provider as lora
from infllava_jax.model import layers
from infllava_jax.model.infllava import InfLlava
from infllava_jax.training import optim


@flax.struct.dataclass
class TrainState:
  """step: [] int32 optimiser updates so far; params and AdamW state (full trees)."""
  step: jax.Array
  params: Any
  opt_state: Any


def split_trainable(params: Any, mask: Any) -> tuple[list, list]:
  """(trainable leaves, frozen leaves) in tree order; `merge_trainable` inverts it."""
  leaves = jax.tree.leaves(params)
  flags = jax.tree.leaves(mask)
  return ([x for x, m in zip(leaves, flags) if m], [x for x, m in zip(leaves, flags) if not m])


def merge_trainable(treedef, mask_leaves: list[bool], trainable: list, frozen: list) -> Any:
  trainable, frozen = iter(trainable), iter(frozen)
  return treedef.unflatten([next(trainable) if m else next(frozen) for m in mask_leaves])


def make_train_step(model: InfLlava, tx: optax.GradientTransformation,
                    train_cfg: ConfigDict, mask: Any,
                    schedule: Callable[[jax.Array], jax.Array],
                    rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES) -> Callable:
  """`step(state, batch) -> (state, metrics)`; jit it with the shardings of
  `training.state` (`jit_train_step`) and trace it under the mesh they are on.

  rules: the logical axis rules the model's and the loss's activation constraints resolve
  by (`config.sharding.rules`), applied while the step is traced.
  batch: the data pipeline's dict (`pipeline.BATCH_KEYS`), leading axis the global batch
  [B, ...].
  metrics: loss (normalised as `train_cfg.loss_normalisation` says), supervised tokens,
  the trainable grad norm and the learning rate used, all scalars on device.
  """
  treedef = jax.tree.structure(mask)
  mask_leaves = jax.tree.leaves(mask)
  dropout = lora.enabled(train_cfg) and train_cfg.lora.dropout > 0

  def loss_fn(trainable, frozen, micro):
    params = merge_trainable(treedef, mask_leaves, trainable, frozen)
    rngs = {"dropout": micro["dropout_rng"][0]} if dropout else {}
    hidden, _ = model.apply({"params": params}, micro["tokens"], micro["pixels"],
                            micro["positions"], micro["segment_ids"], head=False, rngs=rngs)
    ce = optim.token_cross_entropy(hidden, params["llm"]["lm_head"]["kernel"],
                                   micro["targets"], train_cfg, layers.dtype_of(model.cfg.dtype))
    return jnp.sum(ce * micro["weights"]), {"tokens": jnp.sum(micro["loss_mask"])}

  def update(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    weights = optim.loss_weights(batch["loss_mask"], train_cfg.loss_normalisation,
                                 train_cfg.get("loss_group_size"))
    extra = {"weights": weights}
    if dropout:
      key = jax.random.fold_in(jax.random.key(train_cfg.seed), state.step)
      extra["dropout_rng"] = jax.random.split(key, batch["tokens"].shape[0])
    trainable, frozen = split_trainable(state.params, mask)
    loss, aux, grads = optim.accumulate_gradients(
        lambda t, micro: loss_fn(t, frozen, micro), trainable, {**batch, **extra},
        train_cfg.grad_accum_steps)
    full_grads = merge_trainable(treedef, mask_leaves, grads,
                                 [jnp.zeros_like(x) for x in frozen])
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    trainable = optax.apply_updates(trainable, split_trainable(updates, mask)[0])
    params = merge_trainable(treedef, mask_leaves, trainable, frozen)
    metrics = {"loss": loss, "tokens": aux["tokens"], "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding.axis_rules(rules):
      return update(state, batch)

  return step
