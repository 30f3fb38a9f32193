"""LoRA and QLoRA on the language model through qwix: the rules (from `config.train.lora`),
the model that runs the adapters, which params they are, and the frozen base quantised.

    model = provider.lora_model(infllava.build_model(config.model), config.train.lora)
    params = model.init(...)["params"]   # the base params + the adapters

Param layout (`qwix.LoraProvider`'s): in each module whose path `train.lora.targets` names
(by default every linear layer of the LLM's decoder: attn/{q,k,v,o}, mlp/{gate,up,down}; not
the lm_head), beside its `kernel` [in, out] (scanned: [depth, in, out]), `kernel_lora_a`
[in, rank] and `kernel_lora_b` [rank, out] (scanned: a leading depth axis). The product's
output gains (x @ a) @ b * alpha / rank, with dropout on x while training (Hu et al. 2021,
"LoRA", as PEFT computes it). `a` starts he-uniform and `b` at zero, so a new adapter changes
nothing. Adapters are float32 whatever the base's dtype (the master copy AdamW updates, as
the reference's DeepSpeed keeps one); the delta is added in float32 and the sum cast back to
the product's dtype.

base_bits 8 / 4 (QLoRA, Dettmers et al. 2023): the frozen target kernels are held as
`quantize.QuantizedKernel`s (int8 per output channel, int4 per output channel and group of
128 input rows: `quantize.py`'s weight-only scheme) and dequantised in each product; the
adapters stay float32 on top.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import qwix
from flax import linen as nn
from ml_collections import ConfigDict
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from infllava_jax import quantize
from infllava_jax.errors import ConfigError
from infllava_jax.lora import params as lora_params

BASE_MODES = {8: "int8", 4: "int4"}  # train.lora.base_bits -> quantize.py's mode


def enabled(train_cfg: ConfigDict) -> bool:
  """Whether `train_cfg` (a `config.train`) trains LoRA adapters."""
  lora = train_cfg.get("lora")
  return bool(lora is not None and lora.enabled)


def check(lora_cfg: ConfigDict, model_cfg: ConfigDict) -> None:
  """ConfigError naming the field when `train.lora` cannot run on `model_cfg`."""
  if int(lora_cfg.rank) < 1:
    raise ConfigError(f"train.lora.rank={lora_cfg.rank}: expected a positive integer")
  if not 0.0 <= float(lora_cfg.dropout) < 1.0:
    raise ConfigError(f"train.lora.dropout={lora_cfg.dropout}: expected 0 <= dropout < 1")
  if lora_cfg.base_bits not in (None, *BASE_MODES):
    raise ConfigError(f"train.lora.base_bits={lora_cfg.base_bits!r}: expected None (the base "
                      f"in its param dtype), {' or '.join(map(str, BASE_MODES))}")
  if model_cfg.get("mlp_chunks", 1) > 1:
    raise ConfigError(f"model.mlp_chunks={model_cfg.mlp_chunks} with train.lora: the MLP's "
                      "column sets slice its kernels inside one product, where no adapter "
                      "applies; set --config.model.mlp_chunks=1")


def base_mode(lora_cfg: ConfigDict) -> str | None:
  """quantize.py's mode of the frozen base ("int8", "int4"), or None for a float base."""
  return None if lora_cfg.base_bits is None else BASE_MODES[lora_cfg.base_bits]


def _float32(initializer):
  """`initializer` making float32 whatever dtype qwix asks (the base kernel's)."""
  return lambda key, shape, dtype=None: initializer(key, shape, jnp.float32)


class LoraProvider(qwix.LoraProvider):
  """qwix's LoRA provider, with the product's dtype kept (the float32 delta added, the sum
  cast back) and a targeted product whose weight qwix cannot find refused rather than left
  without an adapter."""

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    rule, _ = self._get_current_rule_and_op_id("dot_general", repeated_call=True)
    if rule is not None and flax_util.find_param(rhs, ptq.WithAux) is None:
      path = "/".join(map(str, flax_util.get_current_module_path()))
      raise ValueError(f"LoRA target {path}: its product's right-hand side is not one of the "
                       "module's params (train.lora.targets must name modules that multiply "
                       "by their own kernel)")
    out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                              out_sharding)
    return out.astype(preferred_element_type or lhs.dtype)


def rules(lora_cfg: ConfigDict, training: bool = True) -> list[qwix.LoraRule]:
  """The one rule of `lora_cfg`: its targets, rank, alpha, dropout (while `training`) and
  the base's quantised type."""
  mode = base_mode(lora_cfg)
  return [qwix.LoraRule(
      module_path=lora_cfg.targets, rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
      dropout=float(lora_cfg.dropout) if training else 0.0,
      weight_qtype=None if mode is None else quantize.QTYPES[mode],
      lora_a_initializer=_float32(jax.nn.initializers.he_uniform()),
      lora_b_initializer=_float32(jax.nn.initializers.zeros))]


def lora_model(model: nn.Module, lora_cfg: ConfigDict, training: bool = True,
               quantized_base: bool = True) -> nn.Module:
  """`model` (an `InfLlava` or a `llama.Llama`) with adapters on `lora_cfg.targets`.

  training: dropout on the adapters' input (it then needs a "dropout" rng); False for
    evaluation and generation.
  quantized_base: the targets multiply `quantize_base`'s kernels when `base_bits` is set;
    False runs them on float kernels (to `init` the params: the base is quantised after).
  """
  if not quantized_base:
    lora_cfg = ConfigDict({**lora_cfg.to_dict(), "base_bits": None})
  return qwix.quantize_model(model, LoraProvider(rules(lora_cfg, training)))


def has_adapters(params) -> bool:
  """Whether `params` hold LoRA adapters (a LoRA run's, unmerged)."""
  return any(map(lora_params.is_lora, _flat(params)))


def for_inference(model: nn.Module, config: ConfigDict, params, quantized: str | None = None):
  """`model` running the adapters `params` hold, unmerged and without dropout, with the
  rank and alpha of `config.train.lora` (the run's); `model` itself when they hold none.
  ConfigError when they cannot run: no `train.lora` in `config`, or low-bit inference
  asked on top (merge the adapters first)."""
  if not has_adapters(params):
    return model
  lora_cfg = (config.get("train") or ConfigDict()).get("lora")
  if lora_cfg is None:
    raise ConfigError("the params hold LoRA adapters (kernel_lora_a/b) but the config has no "
                      "train.lora section giving their rank and alpha")
  if quantized or lora_cfg.base_bits is not None:
    raise ConfigError("a LoRA run runs unmerged on its float base only: merge its adapters "
                      "into the kernels first, then quantise")
  return lora_model(model, lora_cfg, training=False)


def is_target_kernel(path: str, lora_cfg: ConfigDict) -> bool:
  """Whether the '/'-joined param path is (part of) a kernel the adapters sit on, frozen in
  a LoRA run (a quantised one's path goes on into its QArray: .../kernel/array/qvalue)."""
  return bool(re.fullmatch(rf"(?:{lora_cfg.targets})/kernel(/.*)?", path))


def _flat(params) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(params, sep="/")


def quantize_base(params, lora_cfg: ConfigDict):
  """`params` with the target kernels quantised as `base_bits` says (`quantize.py`), the
  others (adapters included) unchanged; `params` as they are for a float base."""
  mode = base_mode(lora_cfg)
  if mode is None:
    return params
  flat = _flat(params)
  targets = {p: x for p, x in flat.items() if is_target_kernel(p, lora_cfg)}
  for path in targets:
    if not quantize.QUANTIZED_PARAMS.fullmatch(path):
      raise ConfigError(f"train.lora.base_bits={lora_cfg.base_bits}: {path} is a LoRA target "
                        "but not one of the LLM decoder's linear layers, the only kernels "
                        "quantize.py quantises")
  flat.update(_flat(quantize.quantize_params(
      flax.traverse_util.unflatten_dict(targets, sep="/"), mode)))
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def box_quantized(quantized, boxed):
  """`quantized` (abstract `quantize_base` params) with each QArray's qvalue and scale
  boxed in the logical names of the float kernel in `boxed` (flax `Partitioned`), so that
  `sharding.param_shardings` places them as that kernel."""
  names = {p: x.names for p, x in _flat(boxed).items() if isinstance(x, nn.Partitioned)}

  def box(path, x):
    if not isinstance(x, ptq.WithAux):
      return x
    where = names[path]
    array = x.array.replace(qvalue=nn.Partitioned(x.array.qvalue, where),
                            scale=nn.Partitioned(x.array.scale, where))
    return x.replace(array=array)

  flat = _flat(quantized)
  return flax.traverse_util.unflatten_dict({p: box(p, x) for p, x in flat.items()}, sep="/")

