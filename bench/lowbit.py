"""Weight bytes and greedy decode speed of the language model in bfloat16, int8, int4 and nf4
(`infllava_jax.quantize`, through qwix), side by side in one run.

    python bench/lowbit.py [--repeats 3] [--new-tokens 64]

Two LLM configs: the tiny model's (configs/tiny.py: hidden 64, 2 layers, vocab 512) and a
mid-size one (hidden 1024, 8 layers, 16 heads / 4 KV heads, head dim 64, MLP 2816, vocab
32000: 155 M params, 90 M of them in the quantised linear layers). Random normal(0.02)
weights in bfloat16, bfloat16 compute; one prompt of 32 random tokens, batch 1, greedy, no
stop id. Each mode is `generate.generate_text_tokens` under `jax.jit` (layers unrolled by
`generate.for_decoding`, compiled with `xla_options.compiler_options`, as
`inference.Assistant` runs it), compiled before timing.

Printed per config and mode:
  * weight bytes: all params at their dtypes' bit widths (`quantize.packed_bytes`: int4 and
    nf4 at half a byte, as XLA packs them on TPU and GPU), of which the quantised linear
    layers; and what this backend holds ("on device": `jax.Array.on_device_size_in_bytes`);
  * decode tokens/s: each mode generates 1 token (prefill + first) and N tokens,
    interleaved over the repeats; decode time = median of (t_N - t_1) = N - 1 cached steps;
  * next-token agreement with bfloat16: over the prompt and bfloat16's greedy continuation
    (teacher forced: one forward each), the fraction of positions whose argmax equals
    bfloat16's. Random weights give near-flat logits, so this is a floor, and free greedy
    decoding would part for good at the first difference (tests/test_quantize.py measures
    accuracy on the trained synthetic model);
  * XLA args MB: the compiled program's argument bytes (`memory_analysis`: how XLA sizes
    the params it is given);
  * what XLA made of the quantised products (`dequantise_summary` of the optimised HLO,
    prefill and decode loop together).

"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402
from ml_collections import ConfigDict, FrozenConfigDict  # noqa: E402

from configs import tiny  # noqa: E402
from infllava_jax import generate, quantize, xla_options  # noqa: E402
from infllava_jax.model import llama  # noqa: E402

PROMPT = 32
MODES = (None, "int8", "int4", "nf4")


def mid_config() -> ConfigDict:
  llm = tiny.model_config().llm.copy_and_resolve_references()
  llm.update(dict(vocab_size=32000, width=1024, depth=8, heads=16, kv_heads=4, head_dim=64,
                  mlp_dim=2816, max_positions=2048))
  return llm


def random_llm(cfg: ConfigDict) -> tuple[llama.Llama, dict]:
  """A bfloat16 `llama.Llama` with unrolled layers and random normal(0.02) params."""
  cfg = cfg.copy_and_resolve_references()
  cfg.param_dtype = "bfloat16"
  model = llama.Llama(FrozenConfigDict(cfg), dtype=jnp.bfloat16, scan_layers=False)
  tokens = jnp.zeros((1, PROMPT), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens,
                                               method="tokens_to_logits"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape), jnp.bfloat16),
                        jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                                     abstract["params"],
                                     is_leaf=lambda x: hasattr(x, "value")))
  return model, params


def next_tokens(model: llama.Llama, params, seq: jax.Array) -> np.ndarray:
  """[1, T] tokens -> [T] the argmax next token at each position (teacher forced)."""
  positions = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
  logits, _ = jax.jit(functools.partial(model.apply, method="tokens_to_logits"))(
      {"params": params}, seq, positions)
  return np.asarray(jnp.argmax(logits[0], axis=-1))


def dequantise_summary(hlo: str) -> str:
  """How the optimised HLO multiplies by low-bit (s8 / s4 / u4) weights: the fusions that
  take one and give a float array of its shape (a dequantised copy for a float dot)."""
  fusions = re.findall(r"^%fused_computation\S* \(.*: [su][48]\[([\d,]+)\]\)"
                       r" -> (f32|bf16)\[([\d,]+)\]", hlo, re.M)
  copies = [out for shape, out, out_shape in fusions if shape == out_shape]
  if not copies:
    return "no fusion dequantises a low-bit weight into a float copy"
  return (f"{len(copies)} fusions dequantise a low-bit weight into a whole float copy "
          f"({copies.count('f32')} f32, {copies.count('bf16')} bf16) that a float dot reads")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--new-tokens", type=int, default=64)
  args = parser.parse_args()
  n = args.new_tokens
  options = xla_options.compiler_options(jax.default_backend())
  print(f"backend {jax.default_backend()}; prompt {PROMPT}, {n} new tokens, batch 1, greedy, "
        f"bfloat16 compute; {args.repeats} interleaved repeats, medians")

  for name, cfg in (("tiny", tiny.model_config().llm), ("mid", mid_config())):
    model, params = random_llm(cfg)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, PROMPT)),
                         jnp.int32)
    runs, rows = {}, {}
    for mode in MODES:
      qmodel, qparams = quantize.quantize(model, params, mode)
      fns = {steps: jax.jit(functools.partial(
          generate.generate_text_tokens, qmodel,
          sampling=generate.Sampling(max_new_tokens=steps), pad_id=0),
          compiler_options=options) for steps in (1, n)}
      compiled = fns[n].lower(qparams, prompt, jnp.ones_like(prompt),
                              jax.random.key(0)).compile()

      def run(steps, fns=fns, qparams=qparams):
        out, _ = fns[steps](qparams, prompt, jnp.ones_like(prompt), jax.random.key(0))
        return np.asarray(out.block_until_ready())

      run(1)
      runs[mode] = run
      if mode is None:  # the prompt and bfloat16's greedy continuation
        seq = jnp.concatenate([prompt, jnp.asarray(run(n))], axis=1)
      linear = {p: x for p, x in traverse_util.flatten_dict(qparams, sep="/").items()
                if quantize.QUANTIZED_PARAMS.fullmatch(p)}
      rows[mode] = dict(predicted=next_tokens(qmodel, qparams, seq), bytes=quantize.packed_bytes(qparams),
                        linear=quantize.packed_bytes(linear),
                        device=sum(x.on_device_size_in_bytes()
                                   for x in jax.tree.leaves(qparams)),
                        xla=compiled.memory_analysis().argument_size_in_bytes,
                        hlo=dequantise_summary(compiled.as_text()), times={1: [], n: []})
    for _ in range(args.repeats):
      for steps in (1, n):
        for mode in MODES:
          start = time.perf_counter()
          runs[mode](steps)
          rows[mode]["times"][steps].append(time.perf_counter() - start)

    params_count = sum(x.size for x in jax.tree.leaves(params))
    print(f"\n{name}: hidden {cfg.width}, {cfg.depth} layers, {cfg.heads} heads / "
          f"{cfg.kv_heads} KV, MLP {cfg.mlp_dim}, vocab {cfg.vocab_size} "
          f"({params_count / 1e6:.1f} M params)")
    print(f"  {'mode':9} {'weights MB':>10} {'linear MB':>10} {'on device':>10} "
          f"{'XLA args':>10} {'decode tok/s':>12} {'vs bf16':>8} {'next token = bf16':>17}")
    base = None
    for mode in MODES:
      row = rows[mode]
      decode = statistics.median(f - p for f, p in zip(row["times"][n], row["times"][1]))
      tps = (n - 1) / decode
      base = base or tps
      same = float(np.mean(row["predicted"] == rows[None]["predicted"]))
      print(f"  {mode or 'bfloat16':9} {row['bytes'] / 1e6:10.2f} {row['linear'] / 1e6:10.2f} "
            f"{row['device'] / 1e6:10.2f} {row['xla'] / 1e6:10.2f} {tps:12.1f} "
            f"{tps / base:7.2f}x {same:17.3f}")
    for mode in MODES:
      print(f"  {mode or 'bfloat16':9} optimised HLO: {rows[mode]['hlo']}")


if __name__ == "__main__":
  main()
