"""`lora.params`: finding LoRA pairs, splitting them off, and merging them into kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax.lora import params as lora_params

RANK, ALPHA = 4, 16.0
DEPTH, FAN_IN, FAN_OUT = 3, 8, 6


def tree(dtype=np.float32, seed: int = 0) -> dict:
  """A scanned layer's q kernel with its LoRA pair, and a norm scale without one."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
  return {"llm": {"layers": {
      "attn": {"q": {"kernel": normal(DEPTH, FAN_IN, FAN_OUT),
                     "kernel_lora_a": normal(DEPTH, FAN_IN, RANK),
                     "kernel_lora_b": normal(DEPTH, RANK, FAN_OUT)}},
      "attn_norm": {"scale": normal(DEPTH, FAN_IN)}}}}


def test_merged_kernel_computes_what_the_unmerged_layer_does():
  params = tree()
  q = params["llm"]["layers"]["attn"]["q"]
  x = np.random.default_rng(1).standard_normal((DEPTH, 5, FAN_IN)).astype(np.float32)
  unmerged = x @ q["kernel"] + (x @ q["kernel_lora_a"]) @ q["kernel_lora_b"] * (ALPHA / RANK)
  merged = lora_params.merge(params, rank=RANK, alpha=ALPHA)
  assert set(merged["llm"]["layers"]["attn"]["q"]) == {"kernel"}
  np.testing.assert_allclose(x @ np.asarray(merged["llm"]["layers"]["attn"]["q"]["kernel"]),
                             unmerged, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(merged["llm"]["layers"]["attn_norm"]["scale"],
                                params["llm"]["layers"]["attn_norm"]["scale"])


def test_merge_computes_in_float32_and_returns_the_kernels_dtype():
  params = tree(jnp.bfloat16)
  q = params["llm"]["layers"]["attn"]["q"]
  merged = lora_params.merge(params, rank=RANK, alpha=ALPHA)["llm"]["layers"]["attn"]["q"]
  assert merged["kernel"].dtype == jnp.bfloat16
  f32 = lambda a: np.asarray(a, np.float32)
  want = f32(q["kernel"]) + f32(q["kernel_lora_a"]) @ f32(q["kernel_lora_b"]) * ALPHA / RANK
  np.testing.assert_array_equal(f32(merged["kernel"]), f32(want.astype(jnp.bfloat16)))


def test_split_and_names():
  base, lora = lora_params.split(tree())
  assert set(base["llm"]["layers"]["attn"]["q"]) == {"kernel"}
  assert set(lora["llm"]["layers"]["attn"]["q"]) == set(lora_params.names("kernel"))
  assert "attn_norm" not in lora["llm"]["layers"]
  assert lora_params.is_lora("llm/layers/mlp/up/kernel_lora_b")
  assert lora_params.is_lora(("llm", "layers", "attn", "q", "kernel_lora_a"))
  assert not lora_params.is_lora("llm/layers/attn/q/kernel")


def test_a_lone_factor_or_a_wrong_rank_is_refused():
  params = tree()
  del params["llm"]["layers"]["attn"]["q"]["kernel_lora_b"]
  with pytest.raises(ValueError, match="kernel_lora_a without llm/layers/attn/q/kernel_lora_b"):
    lora_params.merge(params, rank=RANK, alpha=ALPHA)
  with pytest.raises(ValueError, match="not of rank 8"):
    lora_params.merge(tree(), rank=8, alpha=ALPHA)
