"""`infllava compile --inference`: ahead-of-time compile of the generation the `Assistant`
runs, on one device, with its per-device memory: does a model fit a card for inference?

  infllava compile --inference --config infllava_8b [--batch 1] [--context 4096] \\
      [--max-new-tokens 256] [--quantize int8|int4|nf4] [--device-memory 16GiB]
  infllava compile --inference --config infllava_8b --quantize int8 --topology v5e:1x1

The program is `generate.generate_tokens` jitted as `generate.compiled_generate` jits it,
for the model `inference.Assistant` builds: the LLM's layers unrolled
(`generate.for_decoding`), its params in the compute dtype (`inference.load_checkpoint`
narrows them; CLIP, the DEM and the projector stay in their built dtypes) or quantised
(`quantize.quantize`). Its input is `batch` prompts of `context - max_new_tokens` tokens
(the image's slots among them) and one image each; the decode cache it allocates holds
`context` slots. Params and inputs are `ShapeDtypeStruct`s: nothing of model size is
allocated. On CPU the figures are XLA:CPU's, which computes bfloat16 and dequantised
products in float32 (docs/performance.md): its temporaries are larger than a GPU's or a
TPU's; `--topology` compiles with the TPU compiler (libtpu, no TPU needed).

Printed: XLA's per-device memory (arguments = params + prompt inputs, outputs,
temporaries, which hold the KV cache, generated code, total) and an analytic lower bound
(params + KV cache + inputs). Exits 1 when the total exceeds --device-memory, or when
the TPU compiler refuses the program for the chip's memory (its message is printed).
"""

from __future__ import annotations

import functools
import math
import time

from infllava_jax.aot import format_bytes


def abstract_inference_params(config, device, quantize: str | None = None):
  """(model, params) as the Assistant holds them, params as ShapeDtypeStructs on `device`.

  The LLM's params in the compute dtype where that is narrower than their built one (as
  `inference.load_checkpoint` loads them), its layers unrolled (`generate.for_decoding`),
  then quantised in `quantize` mode (`quantize.quantize`) when given.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from infllava_jax import generate
  from infllava_jax import quantize as quantization
  from infllava_jax.model import infllava

  model_cfg = config.model
  llm = model_cfg.llm
  if jnp.dtype(model_cfg.dtype).itemsize < jnp.dtype(llm.param_dtype).itemsize:
    llm.param_dtype = model_cfg.dtype
  model = infllava.build_model(model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                            *infllava.dummy_inputs(model_cfg)))
  params = nn.meta.unbox(boxed["params"])
  decoding = model.clone(llm_scan_layers=False)  # `generate.for_decoding`'s model
  params = jax.eval_shape(lambda p: generate.for_decoding(model, p)[1], params)
  if quantize:
    params = jax.eval_shape(lambda p: quantization.quantize_params(p, quantize), params)
    decoding = quantization.quantized_model(decoding, quantize)
  placed = jax.sharding.SingleDeviceSharding(device)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed),
                        params)
  return decoding, params


def kv_cache_bytes(model_cfg, batch: int, context: int) -> int:
  """Keys and values of every LLM layer for `context` slots of `batch` rows, in the compute
  dtype (`kv_cache.init_cache`), plus the slots' segment ids."""
  import jax.numpy as jnp
  llm = model_cfg.llm
  kv = 2 * llm.depth * batch * llm.kv_heads * context * llm.head_dim
  return kv * jnp.dtype(model_cfg.dtype).itemsize + batch * context * 4


def tree_bytes(tree) -> int:
  """Bytes of a tree of ShapeDtypeStructs at their dtypes' bit widths (4-bit: half a byte)."""
  import jax
  return sum(math.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) // 8
             for x in jax.tree.leaves(tree))


def compile_generation(config, device, batch: int, context: int, max_new_tokens: int,
                       quantize: str | None = None, log=print) -> dict:
  """Lowers and compiles the Assistant's generation for `batch` prompts filling a decode
  cache of `context` slots, `max_new_tokens` of them generated; returns its figures.

  Returns a dict: device_kind, prompt_tokens, memory (XLA's bytes: arguments, outputs,
  temporaries, generated_code, total), bound (list of (label, bytes)), bound_total.
  """
  import jax
  import jax.numpy as jnp
  from infllava_jax import generate, xla_options
  from infllava_jax.model import anyres, infllava

  model_cfg = config.model
  program = generate.Sampling(max_new_tokens=max_new_tokens).program()
  if program.max_new_tokens != max_new_tokens:
    raise ValueError(f"--max-new-tokens {max_new_tokens}: the Assistant's program holds a "
                     f"power of two >= {generate.MIN_PROGRAM_TOKENS} of them; give "
                     f"{program.max_new_tokens}")
  prompt = context - max_new_tokens
  # A llava_next image: the most tokens one can give (its largest grid).
  image_tokens = (anyres.max_image_tokens(model_cfg) if model_cfg.variant == "llava_next"
                  else infllava.num_image_tokens(model_cfg))
  if prompt < image_tokens + 1:
    raise ValueError(f"--context {context} leaves a prompt of {prompt} tokens after "
                     f"{max_new_tokens} new ones; the image alone takes {image_tokens}")
  if context > model_cfg.llm.max_positions:
    raise ValueError(f"--context {context} is over the model's "
                     f"{model_cfg.llm.max_positions} positions")

  t0 = time.perf_counter()
  log(f"building abstract params ({model_cfg.variant}, {quantize or model_cfg.dtype})...")
  model, params = abstract_inference_params(config, device, quantize)
  placed = jax.sharding.SingleDeviceSharding(device)

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

  inputs = {"tokens": arg((batch, prompt), jnp.int32), "mask": arg((batch, prompt), jnp.int32),
            "pixels": jax.tree.map(lambda s: arg(s.shape, s.dtype),
                                   infllava.pixels_shapes(model_cfg, batch, 1))}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=placed)
  settings = {k: arg(v.shape, v.dtype) for k, v in program.settings().items()}
  log(f"  {sum(math.prod(x.shape) for x in jax.tree.leaves(params)):,} params, "
      f"{batch} x {prompt} prompt tokens + {max_new_tokens} new in "
      f"{time.perf_counter() - t0:.1f}s")

  # As `generate.compiled_generate` jits it, with the target's compiler options.
  jitted = jax.jit(functools.partial(generate.generate_tokens, model, sampling=program,
                                     pad_id=0, on_token=None),
                   compiler_options=xla_options.compiler_options(device.platform))
  t0 = time.perf_counter()
  log("lowering...")
  lowered = jitted.lower(params, inputs["tokens"], inputs["mask"], inputs["pixels"], rng,
                         settings=settings)
  log(f"  lowered in {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  log("compiling...")
  memory, refused = None, None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program over the chip's memory, saying by how much.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    refused = str(e).splitlines()[0]
    log(f"  refused in {time.perf_counter() - t0:.1f}s")
  else:
    log(f"  compiled in {time.perf_counter() - t0:.1f}s")
    stats = compiled.memory_analysis()
    memory = {"arguments": stats.argument_size_in_bytes,
              "outputs": stats.output_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
              "generated_code": stats.generated_code_size_in_bytes}
    memory["total"] = sum(memory.values())  # nothing is donated
  # Greedy decoding reads max_new_tokens alone of the settings; jit drops the unused ones.
  input_bytes = tree_bytes([inputs, settings["max_new_tokens"],
                            jax.eval_shape(jax.random.key_data, rng)])
  bound = [(f"params ({quantize or 'unquantised'})", tree_bytes(params)),
           (f"KV cache [{model_cfg.llm.depth} layers x 2 x {batch * model_cfg.llm.kv_heads}, "
            f"{context}, {model_cfg.llm.head_dim}] {model_cfg.dtype}",
            kv_cache_bytes(model_cfg, batch, context)),
           (f"inputs ({batch} prompts of {prompt} tokens, images, rng, max_new_tokens)",
            input_bytes)]
  return {"device_kind": device.device_kind, "prompt_tokens": prompt, "memory": memory,
          "refused": refused, "bound": bound, "bound_total": sum(b for _, b in bound)}


def report(figures: dict, limit: int | None) -> str:
  """The printed summary of `compile_generation`'s figures, with the fit line when `limit`."""
  mem = figures["memory"]
  if mem is None:
    lines = [f"analytic lower bound (one {figures['device_kind']}):"]
    lines += [f"  {format_bytes(b)}  {label}" for label, b in figures["bound"]]
    lines += [f"  {format_bytes(figures['bound_total'])}  total",
              f"does NOT fit: the compiler refused the program: {figures['refused']}"]
    return "\n".join(lines)
  lines = [f"per-device memory (XLA memory_analysis, one {figures['device_kind']}):",
           f"  arguments       {format_bytes(mem['arguments'])}  (params + prompt inputs)",
           f"  outputs         {format_bytes(mem['outputs'])}",
           f"  temporaries     {format_bytes(mem['temporaries'])}  (KV cache, activations)",
           f"  generated code  {format_bytes(mem['generated_code'])}",
           f"  total           {format_bytes(mem['total'])}",
           "analytic lower bound:"]
  lines += [f"  {format_bytes(b)}  {label}" for label, b in figures["bound"]]
  lines += [f"  {format_bytes(figures['bound_total'])}  total",
            f"compiled / bound: {mem['total'] / figures['bound_total']:.3f}"]
  if limit is not None:
    fits = "fits" if mem["total"] <= limit else "does NOT fit"
    lines.append(f"{fits} in --device-memory {format_bytes(limit).strip()}: total "
                 f"{format_bytes(mem['total']).strip()} ({mem['total'] / limit:.0%})")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """`infllava compile --inference ...` (`argv` without --inference)."""
  import argparse
  import os
  import sys
  from infllava_jax.config import config_help, load_config, parse_args_and_overrides
  from infllava_jax.quantize import MODES
  from infllava_jax.aot import parse_size, request_cpu_devices, topology_devices

  parser = argparse.ArgumentParser(prog="infllava compile --inference", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help=config_help("infllava_8b"))
  parser.add_argument("--batch", type=int, default=1, help="prompts generated together (default 1)")
  parser.add_argument("--context", type=int, default=4096,
                      help="decode cache slots: prompt + new tokens (default 4096)")
  parser.add_argument("--max-new-tokens", type=int, default=256,
                      help="tokens generated per prompt, a power of two >= 16 (default 256); "
                           "the prompt fills the rest of --context")
  parser.add_argument("--quantize", choices=MODES, default=None,
                      help="weight-only quantisation of the LLM's linear layers (default: "
                           "none, the compute dtype)")
  parser.add_argument("--topology", default=None,
                      help="compile for one chip of this TPU slice with the TPU compiler, "
                           "e.g. v5e:1x1 (needs libtpu; no TPU)")
  parser.add_argument("--device-memory", type=parse_size, default=None,
                      help="say whether the total fits, and exit 1 when it does not, e.g. 16GiB")
  args, overrides = parse_args_and_overrides(parser, argv, "--config.model.dtype=float32")
  if args.batch < 1:
    parser.error(f"--batch must be >= 1, got {args.batch}")
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: open no TPU
    device = topology_devices(args.topology)[0]
  else:
    request_cpu_devices(1)
  config = load_config(args.config, overrides)
  if "model" not in config:
    parser.error(f"{args.config} has no model section")
  if not args.topology:
    import jax
    device = jax.devices()[0]
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  try:
    figures = compile_generation(config, device, args.batch, args.context,
                                 args.max_new_tokens, args.quantize, log)
  except ValueError as e:
    parser.error(str(e))
  print(report(figures, args.device_memory), flush=True)
  if figures["memory"] is None:
    return 1
  total = figures["memory"]["total"]
  if args.device_memory is not None and total > args.device_memory:
    print(f"infllava compile: per-device total {format_bytes(total).strip()} exceeds "
          f"--device-memory {format_bytes(args.device_memory).strip()}", file=sys.stderr)
    return 1
  return 0
