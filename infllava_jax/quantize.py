"""Weight-only low-bit inference through qwix: which params are quantised (rules by param
path), the quantised params, the model that runs on them, and saving / loading them.

    model, params = quantize.quantize(model, params, "int8")     # or "int4", "nf4"
    quantize.convert("ckpt/", "ckpt-int8/", "int8")               # a converted checkpoint
    model_cfg, params = quantize.load("ckpt-int8/")               # ready for `quantize`

What is quantised: the language model's decoder linear layers (attention q, k, v, o and the
MLP's gate, up, down), 6.98 B of LLaMA-3-8B's 8.03 B params and every weight the decode
loop reads per token except the lm_head. Symmetric absmax scales: int8 one per output
channel; int4 and nf4 one per output channel per group of `group_size` input rows (128, or
the whole input where it is shorter). The released model's LLM in bfloat16, 16.1 GB, takes
9.1 GB in int8 and 5.7 GB in int4 / nf4 (4-bit values packed two to a byte, as XLA holds
them on GPU and TPU). What stays in the checkpoint's dtype, and why:
  * the lm_head (0.53 B params): `generate.last_logits` applies it outside `model.apply`,
    where no interception runs (quantising it means that function takes a quantised kernel);
  * the embedding table (0.53 B): a gather, not a matmul (qwix quantises matmul operands);
  * CLIP, the DEM and the projector (0.32 B): they run once per image at prefill, not once
    per token, so they add nothing to what each decode step reads, and their rounding would
    reach every visual token.

How it runs: `qwix.PtqProvider` intercepts `jnp.dot` in the modules named by
`QUANTIZED_OPS` and multiplies by the `qwix.QArray` it finds there. With floating
activations qwix's `dot_general` dequantises the weight (qvalue * scale) and multiplies in
the activation dtype: weights are held at low bit width, the arithmetic is the float one.
XLA:CPU computes the dequantised weight as a whole float32 array in a fusion of its own and
then the dot reads it (bench/lowbit.py counts those fusions), at every decode step; whether
a GPU or TPU fuses the dequantisation into the dot is not measured here.

Every quantised product runs in the module owning its kernel (`layers.Dense`, and
`llama.GatedDown` for the MLP's `down`), so a rule by module path names it. The params are
quantised by path, with qwix's `quantize_params`, rather than by qwix finding the weights
during `init`: `layers.Dense` and `llama.GatedDown` cast the kernel with `.astype`, which
qwix 0.1.8's `WithAux` cannot do for a QArray (it handles flax's `promote_dtype`):
`QuantizedKernel` casts the QArray's scale, which sets the dequantised dtype.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import qwix
from ml_collections import ConfigDict, FrozenConfigDict
from qwix._src.core import qarray
from qwix._src.providers import ptq

from infllava_jax.checkpoints import converted
from infllava_jax.model import llama

MODES = ("int8", "int4", "nf4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
GROUP_SIZE = 128  # input rows per 4-bit scale (as GPTQ / AWQ checkpoints use)

# The quantised kernels: [in, out], or [depth, in, out] in the scanned layout, in an
# `InfLlava` (llm/...) or a bare `llama.Llama`.
QUANTIZED_PARAMS = re.compile(r"(llm/)?layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel")
# The modules whose products take them: the modules that own them.
QUANTIZED_OPS = r"(llm/)?layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))"

QUANTIZATION_FILE = "quantization.json"  # beside a converted checkpoint's model_config.json


@flax.struct.dataclass
class QuantizedKernel(ptq.WithAux):
  """qwix's PTQ weight (a QArray and how it was made) with a working `astype`: the model
  casts kernels to the compute dtype, and a QArray dequantises to its scale's dtype."""

  def astype(self, dtype):
    # The same object when nothing changes, as jax arrays do: qwix's LoRA finds a weight
    # among the module's params by identity.
    if self.array.dtype == dtype:
      return self
    return self.replace(array=self.array.astype(dtype))


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"quantize={mode!r}; expected one of {', '.join(MODES)}")
  return mode


def how_to_quantize(path: str, shape: tuple[int, ...], mode: str,
                    group_size: int = GROUP_SIZE) -> qarray.HowToQuantize | None:
  """How the param at `path` ('/'-joined) of `shape` is quantised in `mode`, or None when
  it is not. The input axis (second to last) is contracted: int8 scales every other axis's
  entries apart (per output channel, and per layer when scanned); 4-bit modes also split
  the input axis into groups of `group_size` (fewer rows: one group)."""
  if not QUANTIZED_PARAMS.fullmatch(path):
    return None
  rows = shape[-2]
  if check_mode(mode) != "int8" and rows % min(group_size, rows):
    raise ValueError(f"{path}: {rows} input rows are not a multiple of the quantisation "
                     f"group size {group_size}")
  return _how(tuple(shape), mode, group_size)


@functools.cache
def _how(shape: tuple[int, ...], mode: str, group_size: int) -> qarray.HowToQuantize:
  rows = len(shape) - 2
  tiled = {} if mode == "int8" else {rows: min(group_size, shape[rows])}
  return qarray.HowToQuantize(qtype=QTYPES[mode], tiled_axes=tiled,
                              channelwise_axes=[a for a in range(len(shape)) if a != rows])


@functools.cache
def _quantizer(shape: tuple[int, ...], dtype, mode: str, group_size: int):
  """A jitted float kernel [in, out] -> `QuantizedKernel`, compiled once per shape."""
  abstract = QuantizedKernel(jax.ShapeDtypeStruct(shape, dtype), _how(shape, mode, group_size))
  return jax.jit(lambda x: qwix.quantize_params({"w": x}, {"w": abstract})["w"])


def _quantized(x: jax.Array, mode: str, group_size: int) -> QuantizedKernel:
  """A kernel [in, out] or [depth, in, out] quantised; a stacked one layer by layer, so
  the float temporaries of quantising (float32 copies) are one layer's, not the stack's
  (LLaMA-3-8B's MLP: 0.2 GB each instead of 7.5 GB)."""
  if x.ndim == 2:
    return _quantizer(x.shape, x.dtype, mode, group_size)(x)
  layers = [_quantized(layer, mode, group_size) for layer in x]
  return QuantizedKernel(jax.tree.map(lambda *a: jnp.stack(a), *[l.array for l in layers]),
                         _how(x.shape, mode, group_size))


def _flat(params) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(params, sep="/")


def quantize_params(params, mode: str, group_size: int = GROUP_SIZE,
                    consume: bool = False) -> dict:
  """`params` with the kernels of `QUANTIZED_PARAMS` as `QuantizedKernel`s (the others
  unchanged). consume: delete each float kernel once quantised (the caller gives `params`
  up), so memory peaks at one float kernel (and one layer's temporaries) over the result."""
  out = {}
  for path, x in _flat(params).items():
    if isinstance(x, ptq.WithAux) or how_to_quantize(path, x.shape, mode, group_size) is None:
      out[path] = x
      continue
    x = jnp.asarray(x)
    out[path] = _quantized(x, mode, group_size)
    if consume:
      jax.block_until_ready(out[path])
      x.delete()
  return flax.traverse_util.unflatten_dict(out, sep="/")


def params_mode(params) -> str | None:
  """The mode `params` were quantised in, or None for float params."""
  qtypes = {x.how.qtype for x in _flat(params).values() if isinstance(x, ptq.WithAux)}
  modes = [m for m, q in QTYPES.items() if q in qtypes]
  if len(qtypes) > 1 or len(modes) != len(qtypes):
    raise ValueError(f"params quantised in {sorted(map(str, qtypes))}: expected one of {MODES}")
  return modes[0] if modes else None


def quantized_model(model, mode: str):
  """`model` (an `InfLlava` or a `llama.Llama`) running its `QUANTIZED_OPS` products on
  `quantize_params(..., mode)` params; every other product is unchanged. Its MLP is
  computed whole: column sets (`mlp_chunks`, a training memory layout that decoding does
  not use) would slice the kernels, which a QArray cannot be."""
  if isinstance(model, llama.Llama):
    model = model.clone(mlp_chunks=1)
  else:
    cfg = model.cfg.as_configdict()
    cfg.mlp_chunks = 1
    model = model.clone(cfg=FrozenConfigDict(cfg))
  rule = qwix.QtRule(module_path=QUANTIZED_OPS, weight_qtype=QTYPES[check_mode(mode)])
  return qwix.quantize_model(model, qwix.PtqProvider([rule]))


def quantize(model, params, mode: str | None, group_size: int = GROUP_SIZE,
             consume: bool = False):
  """(model, params) for inference in `mode`. Params already quantised (`load`) are kept,
  and mode None takes theirs (float params: nothing changes); another mode: ValueError.
  consume: as `quantize_params`'."""
  held = params_mode(params)
  if mode is None and held is None:
    return model, params
  if held is None:
    params = quantize_params(params, mode, group_size, consume)
  elif mode not in (None, held):
    raise ValueError(f"quantize={mode!r} but the params are quantised as {held!r}")
  return quantized_model(model, mode or held), params


# Saved form: a converted checkpoint (`checkpoints/converted.py`) whose quantised kernels are
# {qvalue, scale} trees, and `quantization.json` naming the mode and group size. Tensorstore
# has no uint4, so nf4's 4-bit codes are stored as uint8 (int4 and int8 as themselves).


def _stored(x: QuantizedKernel) -> dict:
  qvalue = x.array.qvalue
  if qvalue.dtype == jnp.uint4:
    qvalue = qvalue.astype(jnp.uint8)
  return {"qvalue": qvalue, "scale": x.array.scale}


def save(directory: str, model_cfg: ConfigDict, params, mode: str,
         group_size: int = GROUP_SIZE) -> None:
  """Writes `quantize_params(params, mode, group_size)` (or params already quantised so) as
  a converted checkpoint that `load` reads back."""
  params = quantize_params(params, mode, group_size)
  tree = jax.tree.map(lambda x: _stored(x) if isinstance(x, QuantizedKernel) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedKernel))
  # Host arrays: restored as numpy, they go to whichever device loads them (jax.Arrays
  # would come back on the device that saved them).
  converted.save_converted(directory, model_cfg, jax.device_get(tree))
  with open(os.path.join(os.path.abspath(directory), QUANTIZATION_FILE), "w") as f:
    json.dump({"mode": mode, "group_size": group_size}, f, indent=2)


def is_saved(directory: str) -> bool:
  """Whether `directory` is a checkpoint written by `save`."""
  return (converted.is_converted(directory)
          and os.path.isfile(os.path.join(directory, QUANTIZATION_FILE)))


def load(directory: str) -> tuple[ConfigDict, dict]:
  """(model_cfg, params) of a checkpoint written by `save`: quantised kernels as
  `QuantizedKernel`s, the other params as stored, on the default device."""
  with open(os.path.join(directory, QUANTIZATION_FILE)) as f:
    saved = json.load(f)
  mode, group_size = check_mode(saved["mode"]), saved["group_size"]
  model_cfg, stored = converted.load_converted(directory)
  stored = _flat(stored)
  kernels = {p.rsplit("/", 1)[0] for p in stored if p.endswith("/qvalue")}
  out = {p: jnp.asarray(x) for p, x in stored.items() if p.rsplit("/", 1)[0] not in kernels}
  for path in kernels:
    qvalue, scale = stored[f"{path}/qvalue"], stored[f"{path}/scale"]
    how = how_to_quantize(path, qvalue.shape, mode, group_size)
    if how is None:
      raise ValueError(f"{directory}: {path} is stored quantised but is not one of the "
                       "quantised kernels")
    if mode == "nf4":
      qvalue = qvalue.astype(jnp.uint4)
    out[path] = QuantizedKernel(qarray.QArray(jnp.asarray(qvalue), jnp.asarray(scale),
                                              qtype=how.qtype), how)
  return model_cfg, flax.traverse_util.unflatten_dict(out, sep="/")


def convert(source: str, out: str, mode: str, group_size: int = GROUP_SIZE) -> None:
  """Quantises the converted checkpoint `source` into `out` (its tokenizer copied too) on
  the host's CPU, reading the kernels to quantise one at a time and quantising stacked ones
  layer by layer: no accelerator is used, and the host never holds the float model and its
  quantised form together (docs/performance.md#low-bit-inference)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  directory = os.path.join(os.path.abspath(source), converted.PARAMS_DIR)
  stored = _flat(converted.params_metadata(source))
  kernels = [p for p, meta in stored.items() if how_to_quantize(p, meta.shape, mode, group_size)]

  def read(paths):  # {path: array on the CPU} of those stored params only
    item = flax.traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(stored[p].shape, stored[p].dtype, sharding=cpu)
         for p in paths}, sep="/")
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))

  with ocp.PyTreeCheckpointer() as checkpointer:
    params = _flat(read([p for p in stored if p not in kernels]))
    for path in kernels:
      params.update(_flat(quantize_params(read([path]), mode, group_size, consume=True)))
  save(out, converted.read_model_config(source),
       flax.traverse_util.unflatten_dict(params, sep="/"), mode, group_size)
  tokenizer = converted.tokenizer_dir(source)
  if tokenizer:
    converted.save_tokenizer(out, tokenizer)


def packed_bytes(params) -> int:
  """Bytes of the param arrays at their dtypes' bit widths (4-bit values at half a byte, as
  XLA packs them on TPU and GPU; `jax.Array.on_device_size_in_bytes` gives what a backend
  actually holds)."""
  return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(params))
