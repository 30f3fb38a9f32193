"""The train state's shapes and shardings, computed once: what a run allocates, restores into
and compiles for.

`train_setup` traces `model.init` and `tx.init` with `jax.eval_shape` (nothing of model size
is allocated) and places every leaf by the logical names the model gives its params, under
the config's `sharding.rules`. optax builds the AdamW moments with tree maps over the params,
which carry the params' logical names (flax's boxes) into the moments: each moment is placed
like its param by construction, and counts and other scalars are replicated. That one
abstract state is
  - the out_shardings of a fresh start (`init_state`: params and moments born sharded),
  - the target a resume restores into (each array is read straight into its sharding; no
    placeholder state is allocated first),
  - the in/out shardings of the jitted step (`jit_train_step`), which `infllava compile`
    lowers from the same setup: the program it measures is the one a run executes.

With `train.lora` enabled the model carries the adapters (`lora/provider.py`) and only what
trains has AdamW moments (`optim.trainable_mask`). With `train.lora.base_bits` the frozen
target kernels are quantised: a new run's params are read and initialised in float
(`init_target`) and quantised once (`prepare_params`) into the abstract state's layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from infllava_jax import sharding, xla_options
from infllava_jax.data.pipeline import BATCH_KEYS
from infllava_jax.lora import provider as lora
from infllava_jax.model import infllava
from infllava_jax.training import optim
from infllava_jax.training.step import TrainState, make_train_step


class TrainSetup(NamedTuple):
  """What a run's state and step are built from, for one config on one mesh."""
  model: infllava.InfLlava        # what the step applies (with LoRA: qwix's wrapper of it)
  init_model: infllava.InfLlava   # whose `init` gives a new run's params (a float base)
  init_args: tuple                # (rng key, *dummy inputs): what `model.init` takes
  abstract: TrainState            # ShapeDtypeStructs carrying NamedShardings
  init_target: Any                # the params `init_model.init` gives, abstract and placed
  mask: Any                       # bool tree like the params: True where trainable
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  rules: tuple[tuple[str, Any], ...]  # logical axis rules (`config.sharding.rules`)
  mesh: Mesh


def train_setup(config: ConfigDict, mesh: Mesh, total_steps: int) -> TrainSetup:
  """The model, optimiser and abstract state of `config` on `mesh`.

  total_steps: the schedule's length (it changes no shape). The params' random init is
  `train.seed`'s.
  """
  train = config.train
  rules = sharding.rules_from_config(config)
  model = init_model = infllava.build_model(config.model)
  if lora.enabled(train):
    lora.check(train.lora, config.model)
    model = lora.lora_model(model, train.lora)
    init_model = lora.lora_model(init_model, train.lora, quantized_base=False)
  init_args = (jax.random.key(train.seed), *infllava.dummy_inputs(config.model))
  float_boxed = boxed = jax.eval_shape(init_model.init, *init_args)["params"]
  if lora.enabled(train) and lora.base_mode(train.lora):
    quantized = jax.eval_shape(lambda p: lora.quantize_base(p, train.lora),
                               nn.meta.unbox(float_boxed))
    boxed = lora.box_quantized(quantized, float_boxed)
  params = nn.meta.unbox(boxed)
  tx = optim.make_optimizer(train, total_steps, params)
  abstract = abstract_state(boxed, tx, mesh, rules)
  init_target = abstract.params
  if boxed is not float_boxed:
    init_target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               nn.meta.unbox(float_boxed),
                               sharding.param_shardings(float_boxed, mesh, rules, warn=False))
  return TrainSetup(model, init_model, init_args, abstract, init_target,
                    optim.trainable_mask(params, train), tx,
                    optim.learning_rate_schedule(train, total_steps), rules, mesh)


def prepare_params(setup: TrainSetup, train_cfg: ConfigDict, params: Any) -> Any:
  """A new run's params as `setup.init_target` lays them out (donated) -> as the train
  state holds them: with `train.lora.base_bits`, the target kernels quantised."""
  if not (lora.enabled(train_cfg) and lora.base_mode(train_cfg.lora)):
    return params
  return jax.jit(lambda p: lora.quantize_base(p, train_cfg.lora),
                 out_shardings=shardings_of(setup.abstract.params), donate_argnums=0)(params)


def abstract_state(boxed_params: Any, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: tuple[tuple[str, Any], ...]) -> TrainState:
  """TrainState of ShapeDtypeStructs with NamedShardings: params placed by their logical
  names (`sharding.param_shardings`, fitted to shapes), the optimiser state by the names its
  leaves inherit from the params through `tx.init`, the step replicated.

  boxed_params: `jax.eval_shape(model.init, ...)["params"]` (flax `Partitioned` boxes).
  """
  boxed = TrainState(jax.ShapeDtypeStruct((), jnp.int32), boxed_params,
                     jax.eval_shape(tx.init, boxed_params))
  sharding.param_shardings(boxed_params, mesh, rules)  # warns of params left replicated
  shardings = sharding.param_shardings(boxed, mesh, rules, warn=False)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def shardings_of(tree: Any) -> Any:
  """The shardings of a tree of arrays or sharded ShapeDtypeStructs."""
  return jax.tree.map(lambda x: x.sharding, tree)


def init_state(setup: TrainSetup, params: Any) -> TrainState:
  """The state at step 0 around `params` (laid out as `setup.abstract.params`, which they
  are donated to): fresh optimiser state, each leaf created in its sharding."""
  abstract = setup.abstract
  return jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, setup.tx.init(p)),
                 out_shardings=shardings_of(abstract), donate_argnums=0)(params)


def batch_shardings(mesh: Mesh, rules: tuple[tuple[str, Any], ...],
                    model_cfg: ConfigDict | None = None) -> dict[str, Any]:
  """{key: sharding} of the data pipeline's batch: rows split as the rules place `batch`
  (pixels: a dict of shardings for a llava_next `model_cfg`)."""
  pixels = (sharding.batch_sharding(mesh, 5, rules) if model_cfg is None else
            jax.tree.map(lambda s: sharding.batch_sharding(mesh, len(s.shape), rules),
                         infllava.pixels_shapes(model_cfg, 1, 1)))
  return {k: pixels if k == "pixels" else sharding.batch_sharding(mesh, 2, rules)
          for k in BATCH_KEYS}


def jit_train_step(setup: TrainSetup, train_cfg: ConfigDict):
  """The jitted `step(state, batch) -> (state, metrics)` of `training.step`, with the abstract
  state's shardings in and out, the state donated, and the platform's compiler options.

  Call or lower it under `jax.set_mesh(setup.mesh)`; the rules are applied inside the step.
  """
  state_shardings = shardings_of(setup.abstract)
  return jax.jit(
      make_train_step(setup.model, setup.tx, train_cfg, setup.mask, setup.schedule,
                      setup.rules),
      in_shardings=(state_shardings,
                    batch_shardings(setup.mesh, setup.rules, setup.model.cfg)),
      out_shardings=(state_shardings, None), donate_argnums=0,
      compiler_options=xla_options.compiler_options(setup.mesh.devices.flat[0].platform))
