"""Greedy decode speed, ours vs Hugging Face `generate`, on one small LLaMA config.

    python bench/generate.py [--repeats 5]

The train-step benchmark's LLaMA (vocab 2048, hidden 512, 4 layers, 8 heads / 2 KV heads,
head dim 64, MLP 1408), float32 on CPU, the same random weights on both sides (torch init,
converted into ours with `convert.llama_table`). Random prompts of 64 tokens (fixed seed),
batch 1 and batch 8 (rows of the same length, no padding), 128 new tokens, greedy, no stop
id on either side (HF: `eos_token_id=None`; ours: `Sampling(stop_ids=())`), so both
generate exactly 128 tokens, which must be identical (exit status 1 if not).

Ours: `generate.generate_text_tokens` under `jax.jit` (one prefill, then a `lax.while_loop`
of cached decode steps over a fixed-size KV cache; layers unrolled by
`generate.for_decoding`, as `inference.Assistant` runs them), compiled before timing, timed to
`block_until_ready`. HF: `LlamaForCausalLM.generate(do_sample=False)` (sdpa, its default
dynamic cache) under `torch.inference_mode`.

Method: each side runs a 1-token generate (prefill + first token) and a 128-token generate,
all interleaved in one process; decode time = median over repeats of (t_128 - t_1), i.e. 127
cached decode steps, and decode tokens/s = B * 127 / decode time. Printed: total generate
times, decode tokens/s and the ratios ours/HF (targets >= 3x at batch 1, >= 2.5x at batch 8).

Bandwidth bound: the read bandwidth of this machine, measured in the same run as the
larger of a numpy sum and a jitted jax sum over a 1 GiB float32 array (median of several);
a batch-1 decode step must read every weight once except the embedding table (a gather of
one row): the decoder layers, the final norm and the lm_head. Bound per token = those bytes /
bandwidth; printed beside our batch-1 decode time per token (target: ours <= 1.5x the bound).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import flax.linen as nn  # noqa: E402
from ml_collections import FrozenConfigDict  # noqa: E402

from bench.train_step import CFG, build_hf  # noqa: E402
from infllava_jax import generate  # noqa: E402
from infllava_jax.convert import mapping  # noqa: E402
from infllava_jax.convert.llama_table import llama_table  # noqa: E402
from infllava_jax.model import llama  # noqa: E402

PROMPT, NEW_TOKENS, BATCHES = 64, 128, (1, 8)


def our_llm(hf_state) -> tuple[llama.Llama, dict]:
  """Our float32 LLaMA and its params, converted from the HF state dict."""
  model = llama.Llama(FrozenConfigDict(CFG), dtype=jnp.float32)
  tokens = jnp.zeros((1, PROMPT), jnp.int32)
  positions = jnp.zeros((1, PROMPT), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions,
                                               method="tokens_to_logits"))
  params = mapping.torch_to_params(hf_state, llama_table(CFG),
                                   nn.meta.unbox(expected["params"]), source="bench")
  return model, jax.tree.map(jnp.asarray, params)


def read_bandwidth(repeats: int) -> tuple[float, float]:
  """Bytes/s of (numpy sum, jitted jax sum) over a 1 GiB float32 array, medians."""
  host = np.random.default_rng(2).random(2 ** 28, dtype=np.float32)
  dev = jnp.asarray(host)
  jsum = jax.jit(jnp.sum)
  jsum(dev).block_until_ready()
  times = {"numpy": [], "jax": []}
  for _ in range(repeats):
    start = time.perf_counter()
    host.sum()
    times["numpy"].append(time.perf_counter() - start)
    start = time.perf_counter()
    jsum(dev).block_until_ready()
    times["jax"].append(time.perf_counter() - start)
  return tuple(host.nbytes / statistics.median(times[k]) for k in ("numpy", "jax"))


def first_difference(model, params, prompt: np.ndarray, ours: np.ndarray, hf: np.ndarray) -> str:
  """Where a row's tokens first differ, with our logits' top-2 gap at that step on HF's path."""
  pos = int(np.argmax(ours != hf))
  seq = jnp.asarray(np.concatenate([prompt, hf[:pos]])[None], jnp.int32)
  positions = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
  logits, _ = model.apply({"params": params}, seq, positions, method="tokens_to_logits")
  last = np.asarray(logits[0, -1])
  top2 = np.sort(last)[-2:]
  return (f"first difference at new token {pos}: ours {ours[pos]}, HF {hf[pos]}; our logits "
          f"there: ours' {last[ours[pos]]:.6f}, HF's {last[hf[pos]]:.6f}, top-2 gap "
          f"{top2[1] - top2[0]:.2e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  hf = build_hf().eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  hf_state = [(k, v.detach().numpy().copy()) for k, v in hf.state_dict().items()]
  model, params = generate.for_decoding(*our_llm(hf_state))
  weight_bytes = sum(leaf.nbytes for path, leaf in mapping.flatten(params).items()
                     if not path.startswith("embed/"))

  ours_fns = {n: jax.jit(functools.partial(
      generate.generate_text_tokens, model, sampling=generate.Sampling(max_new_tokens=n),
      pad_id=0)) for n in (1, NEW_TOKENS)}
  rng = np.random.default_rng(0)
  prompts = {b: rng.integers(0, CFG.vocab_size, (b, PROMPT)) for b in BATCHES}

  def ours(b, n):
    tokens = jnp.asarray(prompts[b], jnp.int32)
    out, _ = ours_fns[n](params, tokens, jnp.ones_like(tokens), jax.random.key(0))
    return np.asarray(out.block_until_ready())

  def hf_generate(b, n):
    ids = torch.from_numpy(prompts[b]).long()
    with torch.inference_mode():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        do_sample=False)
    return out[:, PROMPT:].numpy()

  identical = True
  for b in BATCHES:  # compiles and warms up both sides; checks the tokens
    ours(b, 1)
    got, want = ours(b, NEW_TOKENS), hf_generate(b, NEW_TOKENS)
    hf_generate(b, 1)
    same = got.shape == want.shape and bool((got == want).all())
    print(f"batch {b}: tokens identical: {same}")
    if not same:
      identical = False
      for row in range(b):
        if not (got[row] == want[row]).all():
          print(f"  row {row}: " + first_difference(model, params, prompts[b][row], got[row],
                                                    want[row]))

  samples = {(side, b, n): [] for side in ("ours", "hf") for b in BATCHES
             for n in (1, NEW_TOKENS)}
  for _ in range(args.repeats):
    for b in BATCHES:
      for n in (1, NEW_TOKENS):
        for side, fn in (("ours", ours), ("hf", hf_generate)):
          start = time.perf_counter()
          fn(b, n)
          samples[(side, b, n)].append(time.perf_counter() - start)
  bw_numpy, bw_jax = read_bandwidth(max(args.repeats, 5))
  bandwidth = max(bw_numpy, bw_jax)

  steps = NEW_TOKENS - 1
  print(f"config: hidden {CFG.width}, {CFG.depth} layers, {CFG.heads} heads / {CFG.kv_heads} KV, "
        f"MLP {CFG.mlp_dim}, vocab {CFG.vocab_size}; prompt {PROMPT}, {NEW_TOKENS} new tokens, "
        f"greedy, float32; {args.repeats} interleaved repeats, medians")
  decode_tps = {}
  for b in BATCHES:
    row = {}
    for side in ("ours", "hf"):
      full = samples[(side, b, NEW_TOKENS)]
      decode = statistics.median(f - p for f, p in zip(full, samples[(side, b, 1)]))
      row[side] = (statistics.median(full), statistics.median(samples[(side, b, 1)]), decode)
      decode_tps[(side, b)] = b * steps / decode
    target = 3.0 if b == 1 else 2.5
    print(f"batch {b}: generate {NEW_TOKENS} tokens: HF {row['hf'][0] * 1e3:7.1f} ms  "
          f"ours {row['ours'][0] * 1e3:7.1f} ms ({row['hf'][0] / row['ours'][0]:.2f}x); "
          f"prefill+1: HF {row['hf'][1] * 1e3:6.1f} ms  ours {row['ours'][1] * 1e3:6.1f} ms")
    print(f"         decode tokens/s: HF {decode_tps[('hf', b)]:8.1f}  ours "
          f"{decode_tps[('ours', b)]:8.1f}  ratio ours/HF "
          f"{decode_tps[('ours', b)] / decode_tps[('hf', b)]:.2f}x (target >= {target}x)")
  per_token = 1.0 / decode_tps[("ours", 1)]
  bound = weight_bytes / bandwidth
  print(f"read bandwidth: numpy sum {bw_numpy / 1e9:.1f} GB/s, jax sum {bw_jax / 1e9:.1f} GB/s "
        f"(1 GiB float32, using the larger)")
  print(f"batch-1 decode per token: ours {per_token * 1e3:.3f} ms; weights read once "
        f"({weight_bytes / 1e6:.1f} MB, embedding excluded) at {bandwidth / 1e9:.1f} GB/s: "
        f"{bound * 1e3:.3f} ms; ratio {per_token / bound:.2f} (target <= 1.5)")
  print(f"tokens identical: {identical}")
  if not identical:
    sys.exit(1)


if __name__ == "__main__":
  main()
