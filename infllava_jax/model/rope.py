"""Rotary position embeddings as Hugging Face's LLaMA computes them, LLaMA-3.1's scaling
included."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

ROPE_TYPES = ("llama3",)


def rope_inverse_frequencies(cfg: ConfigDict) -> np.ndarray:
  """[K/2] float32 inverse frequencies, computed in float32 exactly as transformers 5.23 does.

  `cfg.rope_scaling` None gives plain RoPE (`_compute_default_rope_parameters`); a dict with
  rope_type "llama3" applies LLaMA-3.1's band-wise scaling (`_compute_llama3_parameters`):
  long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
  """
  dim = cfg.head_dim
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) **
                    (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
  scaling = cfg.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"model.llm.rope_scaling.rope_type={rope_type!r} is not supported; "
                     f"expected one of {ROPE_TYPES} or rope_scaling=None")
  f32 = np.float32
  factor = f32(scaling["factor"])
  low_freq_factor = f32(scaling["low_freq_factor"])
  high_freq_factor = f32(scaling["high_freq_factor"])
  old_context_len = f32(scaling["original_max_position_embeddings"])
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  wavelen = f32(2 * math.pi) / inv_freq
  inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor -
                                                                    low_freq_factor)
  smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin: [B, T, K] in `dtype` for positions [B, T] (angles in float32, as HF)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF's rotate-half RoPE: x * cos + rotate_half(x) * sin. x: [B, T, N, K]; cos, sin: [B, T, K]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
