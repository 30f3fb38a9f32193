"""One prepared accelerator check: correctness and speed of the pieces that differ per platform.

    python bench/accelerator_check.py --out DIR [--layers 2] [--decode-layers 32] [--reduced]

Runs on jax's default device (one GPU or TPU chip; sized for 8 minutes there, not yet timed
on one), writes DIR/accelerator_check.json and prints a short table. Sections, each guarded
(a failure is recorded with its one-line error and the others still run):

  logits      the tiny preset's INF-LLaVA (random init, one image, 64 tokens): logits on the
              device against the same params on CPU, float32 under "highest" matmul
              precision; check: max |diff| <= 1e-4 x max |logit|.
  attention   the LLM's causal attention kernels available on the platform
              (`attention.decoder_attention`: "einsum" and "xla" everywhere, "cudnn" on GPU,
              "splash" on TPU) at bfloat16, forward and gradient (one VJP), each against
              "einsum" run in float32 on the same inputs, with its time per forward+backward;
              check: relative L2 error <= 2e-2 of output and of each gradient.
  train_step  the stage-2 step as the Trainer builds it (`training.step.make_train_step`, the
              preset's AdamW, bf16 compute over float32 params, remat "nothing_saveable",
              MLP in 8 column sets) on a LLaMA-3-8B-shaped LLM of `--layers` layers (hidden
              4096, MLP 14336, 32 / 8 KV heads of 128, vocab 128257), one row of 2048 tokens
              holding one image; CLIP, DCM and DEM at the tiny preset's size, so the LLM is the
              step. Step time, tokens/s and MFU by `training/flops.py`'s formula (model
              FLOPs: remat's recomputed forward not counted) over the device's bf16 peak
              (`flops.PEAK_FLOPS` by device kind, or --peak-flops); check: finite losses.
  decode      greedy decoding of the bf16 LLM with `--decode-layers` layers (32: LLaMA-3-8B
              itself, random weights) as `bench/generate.py` times it (`generate.for_decoding`,
              `generate.generate_text_tokens`): prompt 128, decode tokens/s = B x 63 / (t_64 -
              t_1) (fastest of the repeats) at batch 1 and 8, beside the bytes-per-token
              bound (`bench/bandwidth.py`: the weights a step reads over the device's
              measured read bandwidth); check: each row's 64 ids are in the vocabulary. The
              same for the LLM's linear layers in int8 (`infllava_jax.quantize`, weight-only,
              through qwix), with its speed over bf16's (a memory-bound decode should gain).

Memory per section: XLA's `compiled.memory_analysis()` of its main program, and the device's
`memory_stats()` (bytes in use and the process's peak so far: the sections run from the
smallest; "n/a" where the backend gives none, as on CPU).

Sizes: the step holds ~1.5B params (the 128257-row embedding and lm_head dominate) with
float32 AdamW state, ~24 GiB, and the 32-layer decode 16 GB of bf16 weights: on 16 GiB chips
(TPU v5e) those sections record the out-of-memory error; `--decode-layers 16` fits the decode.

`--reduced` (automatic on CPU) shrinks the widths, lengths and repeats so the whole check runs
in about a minute on a CPU; tests/bench/test_accelerator_check.py runs it so, to keep it working.
Exit status 1 when a check fails or a section raises, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from bench.bandwidth import decode_read_bytes, read_bandwidth  # noqa: E402
from infllava_jax import generate, quantize, sharding, xla_options  # noqa: E402
from infllava_jax.model import attention, infllava  # noqa: E402
from infllava_jax.presets import infllava_8b, infllava_8b_stage2, tiny  # noqa: E402
from infllava_jax.training import flops, optim  # noqa: E402
from infllava_jax.aot import format_bytes  # noqa: E402
from infllava_jax.training.step import TrainState, make_train_step  # noqa: E402

LOGITS_TOLERANCE = 1e-4     # max |device - CPU| / max |CPU logit|, float32
ATTENTION_TOLERANCE = 2e-2  # relative L2 error of a bf16 kernel against float32 einsum
PROMPT, NEW_TOKENS, DECODE_BATCHES = 128, 64, (1, 8)
# Reduced (CPU) sizes: the full run's structure at a small width and length.
REDUCED_LLM = dict(width=256, mlp_dim=512, heads=4, kv_heads=2, head_dim=64, vocab_size=1024)
REDUCED_LENGTH, REDUCED_PROMPT, REDUCED_NEW_TOKENS = 256, 16, 32


def timed(fn: Callable[[], Any], repeats: int) -> float:
  """Median seconds of `fn()` (blocked until ready) over `repeats` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_memory(compiled) -> dict[str, int] | str:
  """XLA's byte counts of a compiled program (`memory_analysis`), or "n/a"."""
  stats = compiled.memory_analysis()
  if stats is None:
    return "n/a"
  return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
          "alias": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
          "generated_code": stats.generated_code_size_in_bytes}


def device_memory(device: jax.Device) -> dict[str, int] | str:
  """Bytes in use and the process's peak so far on `device`, or "n/a" (CPU gives none)."""
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return "n/a"
  return {"bytes_in_use": stats["bytes_in_use"], "peak_bytes_in_use": stats["peak_bytes_in_use"]}


@contextlib.contextmanager
def on_device(device: jax.Device):
  """The mesh of `device` alone with the logical axis rules in scope, as the Trainer traces
  its step (the attention kernel is picked from the mesh's platform). Params are made
  outside it (`sharding.init_sharded`), as the Trainer makes them."""
  with jax.set_mesh(sharding.make_mesh("fsdp", [device])), sharding.axis_rules():
    yield


def image_row(model_cfg: ConfigDict, length: int, seed: int) -> dict[str, np.ndarray]:
  """One row of `length` random tokens holding one image's slots after 4 text tokens, its
  next-token targets and loss mask (off on the slots and the last token), and random pixels."""
  rng = np.random.default_rng(seed)
  n_img = infllava.num_image_tokens(model_cfg)
  tokens = rng.integers(0, model_cfg.llm.vocab_size, (1, length)).astype(np.int32)
  tokens[:, 4:4 + n_img] = model_cfg.image_token_id
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = ((tokens != model_cfg.image_token_id) & (targets != model_cfg.image_token_id))
  loss_mask[:, -1] = False
  side = infllava.input_size(model_cfg)
  return {"tokens": tokens, "targets": np.where(loss_mask, targets, 0),
          "loss_mask": loss_mask.astype(np.float32),
          "positions": np.arange(length, dtype=np.int32)[None],
          "segment_ids": np.ones((1, length), np.int32),
          "pixels": rng.normal(size=(1, 1, side, side, 3)).astype(np.float32)}


def check_logits(device: jax.Device) -> dict:
  """The tiny model's logits on `device` against CPU (float32, "highest" precision)."""
  cfg = tiny.model_config()
  model = infllava.build_model(cfg)
  row = image_row(cfg, 64, seed=0)
  inputs = (row["tokens"], row["pixels"])
  params = jax.jit(model.init)(jax.random.key(0), *inputs)

  def logits_on(dev):
    with on_device(dev), jax.default_matmul_precision("highest"):
      fn = jax.jit(lambda p, t, x: model.apply(p, t, x)[0])
      return np.asarray(fn(*jax.device_put((params, *inputs), dev)))

  cpu_device = jax.devices("cpu")[0]
  ours = logits_on(device)
  cpu = ours if device == cpu_device else logits_on(cpu_device)  # reduced mode: one run
  diff = float(np.max(np.abs(ours - cpu)))
  scale = float(np.max(np.abs(cpu)))
  return {"shape": list(ours.shape), "max_abs_diff": diff, "max_abs_logit": scale,
          "relative": diff / scale, "tolerance": LOGITS_TOLERANCE,
          "passed": bool(np.isfinite(ours).all() and diff <= LOGITS_TOLERANCE * scale)}


def available_kernels(platform: str) -> list[str]:
  return ["einsum", "xla"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(platform, [])


def relative_error(got: jax.Array, want: jax.Array) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_attention(device: jax.Device, reduced: bool, repeats: int) -> dict:
  """Each available kernel at bf16 against float32 "einsum": output and q/k/v gradients."""
  b, t, h, n, k = (1, 256, 4, 2, 64) if reduced else (1, 2048, 32, 8, 128)
  keys = jax.random.split(jax.random.key(1), 4)
  q, d_out = (jax.random.normal(key, (b, t, h, k)) for key in keys[:2])
  kv = [jax.random.normal(key, (b, t, n, k)) for key in keys[2:]]
  operands = jax.device_put((q, *kv, d_out), device)
  scale = k ** -0.5

  def forward_backward(kernel: str):
    def attend(q, k, v):
      mask = jnp.ones((b, t), jnp.int32) if attention.uses_splash(kernel, t) else None
      return attention.decoder_attention(q, k, v, mask, scale, kernel, chunk=128)

    def fn(q, k, v, d_out):
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(d_out.astype(out.dtype))

    return jax.jit(fn)

  with on_device(device):
    want_out, want_grads = forward_backward("einsum")(*operands)
    bf16 = [x.astype(jnp.bfloat16) for x in operands]
    results = {"shape": {"batch": b, "length": t, "heads": h, "kv_heads": n, "head_dim": k},
               "tolerance": ATTENTION_TOLERANCE, "reference": "einsum, float32", "kernels": {}}
    for kernel in available_kernels(device.platform):
      try:
        fn = forward_backward(kernel)
        out, grads = fn(*bf16)
        errors = {"out": relative_error(out, want_out),
                  **{f"d{name}": relative_error(g, w)
                     for name, g, w in zip("qkv", grads, want_grads)}}
        results["kernels"][kernel] = {
            "relative_error": errors, "fwd_bwd_ms": 1e3 * timed(lambda: fn(*bf16), repeats),
            "passed": all(math.isfinite(e) and e <= ATTENTION_TOLERANCE
                          for e in errors.values())}
      except Exception as error:  # noqa: BLE001 (one kernel's failure is a result)
        results["kernels"][kernel] = {"error": one_line(error), "passed": False}
  results["passed"] = all(r["passed"] for r in results["kernels"].values())
  return results


def set_llm_size(llm: ConfigDict, reduced: bool, depth: int) -> None:
  """`depth` layers of LLaMA-3-8B's widths, or of `REDUCED_LLM`'s."""
  llm.depth = depth
  if reduced:
    llm.update(REDUCED_LLM)


def stage2_config(reduced: bool, depth: int, length: int) -> ConfigDict:
  """The stage-2 preset with an LLM of `depth` layers (real widths unless `reduced`) and
  the tiny preset's CLIP, DCM and DEM; one row of `length` tokens, no accumulation."""
  config = infllava_8b_stage2.get_config()
  small = tiny.model_config()
  model = config.model
  model.vision, model.dcm, model.dem = small.vision, small.dcm, small.dem
  model.vision.param_dtype = "bfloat16"  # frozen, as the preset's
  set_llm_size(model.llm, reduced, depth)
  config.data.max_length = length
  config.data.max_images_per_row = 1
  config.data.batch_size = 1
  config.train.grad_accum_steps = 1
  config.train.steps = 100
  return config


def check_train_step(device: jax.Device, reduced: bool, depth: int, repeats: int,
                     peak_flops: float | None) -> dict:
  """The Trainer's stage-2 step on a LLaMA-3-8B-shaped LLM: time, tokens/s, MFU, memory."""
  length = REDUCED_LENGTH if reduced else 2048
  config = stage2_config(reduced, depth, length)
  train = config.train
  model = infllava.build_model(config.model)
  mesh = sharding.make_mesh("fsdp", [device])
  variables, _ = sharding.init_sharded(
      model.init, mesh, jax.random.key(0), *infllava.dummy_inputs(config.model))
  params = variables["params"]
  mask = optim.trainable_mask(params, train)
  trainable = [p for p, m in zip(jax.tree.leaves(optim.param_paths(params)),
                                 jax.tree.leaves(mask)) if m]
  tx = optim.make_optimizer(train, train.steps, params)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  del params, variables
  step = jax.jit(make_train_step(model, tx, train, mask,
                                 optim.learning_rate_schedule(train, train.steps)),
                 donate_argnums=0, compiler_options=xla_options.compiler_options(device.platform))
  batch = jax.device_put(image_row(config.model, length, seed=1), device)
  start = time.perf_counter()
  with on_device(device):
    compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # the first run allocates
  losses = [float(metrics["loss"])]
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))  # waits for the step
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  step_flops = flops.train_step_flops(config.model, 1, length, 1,
                                      infllava.num_image_tokens(config.model), trainable)
  peak = peak_flops or flops.PEAK_FLOPS.get(device.device_kind)
  llm = config.model.llm
  return {
      "llm": {k: llm[k] for k in ("depth", "width", "mlp_dim", "heads", "kv_heads", "head_dim",
                                  "vocab_size")},
      "tokens": length, "rows": 1, "compute_dtype": config.model.dtype,
      "remat_policy": config.model.remat_policy, "compile_s": compile_s, "step_s": step_s,
      "tokens_per_s": length / step_s, "flops_per_step": step_flops,
      "flops_per_s": step_flops / step_s, "peak_flops": peak,
      "peak_source": ("--peak-flops" if peak_flops else
                      f"flops.PEAK_FLOPS[{device.device_kind!r}]" if peak else
                      f"none known for {device.device_kind!r} (--peak-flops)"),
      "mfu": step_flops / step_s / peak if peak else None,
      "losses": losses, "compiled_memory": compiled_memory(compiled),
      "device_memory": device_memory(device),
      "passed": all(math.isfinite(x) for x in losses)}


def check_decode(device: jax.Device, reduced: bool, depth: int, repeats: int) -> dict:
  """Greedy bf16 decode tokens/s at batch 1 and 8 beside the bytes-per-token bound."""
  prompt, new = (REDUCED_PROMPT, REDUCED_NEW_TOKENS) if reduced else (PROMPT, NEW_TOKENS)
  model_cfg = infllava_8b.model_config()  # as inference builds it: bf16 compute
  set_llm_size(model_cfg.llm, reduced, depth)
  model_cfg.llm.param_dtype = "bfloat16"
  llm = infllava.language_model(model_cfg)
  tokens = jnp.zeros((1, prompt), jnp.int32)
  variables, _ = sharding.init_sharded(
      functools.partial(llm.init, method="tokens_to_logits"),
      sharding.make_mesh("fsdp", [device]), jax.random.key(0), tokens, jnp.zeros_like(tokens))
  llm, params = generate.for_decoding(llm, variables["params"], consume=True)
  del variables
  rates = read_bandwidth(max(repeats, 3), host_readers=device.platform == "cpu", device=device,
                         size=2 ** 26 if reduced else 2 ** 30)
  bandwidth = max(rates.values())
  vocab = model_cfg.llm.vocab_size
  bf16 = decode_speeds(llm, params, device, prompt, new, repeats, vocab, bandwidth)
  # The same weights, the LLM's linear layers in int8 (`infllava_jax.quantize`, weight-only).
  int8 = decode_speeds(*quantize.quantize(llm, params, "int8"), device, prompt, new, repeats,
                       vocab, bandwidth)
  for batch, row in int8["rates"].items():
    row["vs_bf16"] = row["decode_tokens_per_s"] / bf16["rates"][batch]["decode_tokens_per_s"]
  return {"layers": depth, "prompt": prompt, "new_tokens": new, "read_bandwidth": rates,
          "weight_bytes_per_step": bf16["weight_bytes"],
          "bound_ms_per_token_batch1": 1e3 * bf16["weight_bytes"] / bandwidth,
          "bf16": {str(b): r for b, r in bf16["rates"].items()},
          "int8": {str(b): r for b, r in int8["rates"].items()},
          "int8_weight_bytes_per_step": int8["weight_bytes"],
          "compiled_memory": {f"{kind} batch {b}": m for kind, run in (("bf16", bf16),
                                                                      ("int8", int8))
                              for b, m in run["memory"].items()},
          "device_memory": device_memory(device),
          "passed": all(r["tokens_valid"] for run in (bf16, int8)
                        for r in run["rates"].values())}


def decode_speeds(llm, params, device: jax.Device, prompt: int, new: int, repeats: int,
                  vocab: int, bandwidth: float) -> dict:
  """Decode tokens/s of `llm` on `params` at each of DECODE_BATCHES, beside the bound of
  reading the bytes a step reads (`params` but the embedding) at `bandwidth`."""
  options = xla_options.compiler_options(device.platform)
  rng = np.random.default_rng(0)
  results, memory = {}, {}
  for batch in DECODE_BATCHES:
    prompts = jax.device_put(
        rng.integers(0, vocab, (batch, prompt)).astype(np.int32), device)
    args = (params, prompts, jnp.ones_like(prompts), jax.random.key(0))
    runs = {}
    for n in (1, new):
      fn = jax.jit(functools.partial(generate.generate_text_tokens, llm,
                                     sampling=generate.Sampling(max_new_tokens=n), pad_id=0),
                   compiler_options=options)
      with on_device(device):
        compiled = fn.lower(*args).compile()
      out, lengths = jax.device_get(compiled(*args))
      runs[n] = functools.partial(compiled, *args)
    memory[batch] = compiled_memory(compiled)
    # Interleaved; the fastest of each, as load on the host only ever adds time.
    samples = [(timed(runs[new], 1), timed(runs[1], 1)) for _ in range(repeats)]
    decode_s = min(s[0] for s in samples) - min(s[1] for s in samples)
    results[batch] = {"decode_tokens_per_s": batch * (new - 1) / decode_s,
                      "generate_s": min(s[0] for s in samples),
                      # no stop ids: every row generates `new` ids of the vocabulary
                      "tokens_valid": bool(out.shape == (batch, new) and (lengths == new).all()
                                           and ((out >= 0) & (out < vocab)).all())}
  weight_bytes = decode_read_bytes(params)
  for batch, row in results.items():
    row["bound_tokens_per_s"] = batch * bandwidth / weight_bytes
    row["of_bound"] = row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
  return {"rates": results, "memory": memory, "weight_bytes": weight_bytes}


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def table(report: dict) -> str:
  """The short printed summary of the JSON report."""
  dev = report["device"]
  lines = [f"device: {dev['kind']} ({dev['platform']}), jax {report['jax']}"
           f"{', reduced mode' if report['reduced'] else ''}"]
  s = report["sections"]

  def gib(value) -> str:
    return format_bytes(value).strip() if isinstance(value, (int, float)) else str(value)

  def peak(section) -> str:
    mem = section.get("device_memory", "n/a")
    return gib(mem["peak_bytes_in_use"]) if isinstance(mem, dict) else mem

  def status(section) -> str:
    return "ok" if section.get("passed") else "FAIL"

  for name, section in s.items():
    if "error" in section:
      lines.append(f"{name:11s} FAIL  {section['error']}")
      continue
    if name == "logits":
      lines.append(f"{name:11s} {status(section):4s}  max |device - CPU|"
                   f" {section['max_abs_diff']:.2e} of max |logit| {section['max_abs_logit']:.2f}"
                   f" (rel {section['relative']:.1e}, tol {section['tolerance']:.0e})")
    elif name == "attention":
      shape = section["shape"]
      lines.append(f"{name:11s} {status(section):4s}  bf16 vs float32 einsum, T {shape['length']},"
                   f" {shape['heads']}/{shape['kv_heads']} heads of {shape['head_dim']}"
                   f" (tol {section['tolerance']:.0e})")
      for kernel, r in section["kernels"].items():
        if "error" in r:
          lines.append(f"{'':11s} {kernel:7s} FAIL  {r['error']}")
          continue
        errs = " ".join(f"{k} {v:.1e}" for k, v in r["relative_error"].items())
        lines.append(f"{'':11s} {kernel:7s} {status(r):4s}  rel err {errs};"
                     f" fwd+bwd {r['fwd_bwd_ms']:.2f} ms")
    elif name == "train_step":
      llm = section["llm"]
      mfu = f"{100 * section['mfu']:.1f}%" if section["mfu"] else "n/a (no peak for this device)"
      mem = section["compiled_memory"]
      lines.append(f"{name:11s} {status(section):4s}  {llm['depth']} layers x {llm['width']}"
                   f" (MLP {llm['mlp_dim']}, vocab {llm['vocab_size']}), {section['tokens']}"
                   f" tokens {section['compute_dtype']}: {section['step_s'] * 1e3:.1f} ms/step,"
                   f" {section['tokens_per_s']:,.0f} tokens/s, "
                   f"{section['flops_per_s'] / 1e12:.3f} TFLOP/s, MFU {mfu}")
      peak_flops = (f" = {section['peak_flops'] / 1e12:.0f} TFLOP/s" if section["peak_flops"]
                    else "")
      lines.append(f"{'':11s}       bf16 peak: {section['peak_source']}{peak_flops};"
                   f" XLA temporaries {gib(mem['temporaries']) if isinstance(mem, dict) else mem};"
                   f" device peak {peak(section)}")
    elif name == "decode":
      lines.append(f"{name:11s} {status(section):4s}  {section['layers']} layers bf16, prompt"
                   f" {section['prompt']}, {section['new_tokens']} new; weights read per step"
                   f" {gib(section['weight_bytes_per_step'])}, bound"
                   f" {section['bound_ms_per_token_batch1']:.3f} ms/token at batch 1;"
                   f" device peak {peak(section)}")
      for batch, r in section["bf16"].items():
        lines.append(f"{'':11s}       batch {batch}: {r['decode_tokens_per_s']:,.1f} tokens/s,"
                     f" bound {r['bound_tokens_per_s']:,.1f} ({100 * r['of_bound']:.0f}% of it)")
      lines.append(f"{'':11s}       int8 (weights read per step {gib(section['int8_weight_bytes_per_step'])}):")
      for batch, r in section["int8"].items():
        lines.append(f"{'':11s}       batch {batch}: {r['decode_tokens_per_s']:,.1f} tokens/s,"
                     f" {r['vs_bf16']:.2f}x bf16, bound {r['bound_tokens_per_s']:,.1f}"
                     f" ({100 * r['of_bound']:.0f}% of it)")
  lines.append(f"all checks passed: {report['passed']}")
  return "\n".join(lines)


def run_sections(sections: dict[str, Callable[[], dict]], verbose: bool = False) -> dict:
  """{name: its result dict with "seconds"}, or {"error": one line, "passed": False} where it
  raised (its traceback on stderr when `verbose`); every section runs."""
  results = {}
  for name, run in sections.items():
    start = time.perf_counter()
    try:
      result = run()
    except Exception as error:  # noqa: BLE001 (recorded; the other sections still run)
      if verbose:
        traceback.print_exc()
      result = {"error": one_line(error), "passed": False}
    result["seconds"] = time.perf_counter() - start
    results[name] = result
    print(f"[{name}: {result['seconds']:.1f}s]", file=sys.stderr, flush=True)
  return results


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for accelerator_check.json")
  parser.add_argument("--layers", type=int, default=2, help="LLM layers of the train step")
  parser.add_argument("--decode-layers", type=int, default=None,
                      help="LLM layers decoded (default: 32, LLaMA-3-8B; 2 when reduced)")
  parser.add_argument("--reduced", action="store_true",
                      help="small widths and lengths (automatic on CPU)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats (default 5; 2 when reduced)")
  parser.add_argument("--peak-flops", type=float, default=None,
                      help="the device's bf16 peak FLOP/s for the MFU (default: "
                           "flops.PEAK_FLOPS by device kind)")
  parser.add_argument("--verbose", action="store_true", help="tracebacks of failed sections")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  reduced = args.reduced or device.platform == "cpu"
  repeats = (2 if reduced else 5) if args.repeats is None else args.repeats
  decode_layers = (2 if reduced else 32) if args.decode_layers is None else args.decode_layers
  if min(args.layers, decode_layers, repeats) < 1:
    parser.error("--layers, --decode-layers and --repeats must be >= 1")

  sections = {  # from the smallest, so each device peak so far is mostly its own
      "logits": lambda: check_logits(device),
      "attention": lambda: check_attention(device, reduced, repeats),
      "decode": lambda: check_decode(device, reduced, decode_layers, repeats),
      "train_step": lambda: check_train_step(device, reduced, args.layers, repeats,
                                             args.peak_flops),
  }
  report = {"device": {"kind": device.device_kind, "platform": device.platform,
                       "count": jax.device_count()},
            "jax": jax.__version__, "reduced": reduced,
            "sections": run_sections(sections, args.verbose)}
  report["passed"] = all(s["passed"] for s in report["sections"].values())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "accelerator_check.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(table(report))
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
