"""The KV cache's layout: heads-major buffers, stacked or one per layer, written in place."""

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from infllava_jax.model import kv_cache

CFG = ConfigDict(dict(depth=3, kv_heads=2, head_dim=4))


def test_init_cache_stacked_and_per_layer():
  stacked = kv_cache.init_cache(CFG, batch=2, max_len=5, dtype="float32")
  assert stacked.k.shape == stacked.v.shape == (3, 2 * 2, 5, 4)
  assert stacked.k.dtype == jnp.float32 and stacked.segment_ids.shape == (2, 5)
  assert int(stacked.index) == 0 and not np.any(np.asarray(stacked.segment_ids))
  per_layer = kv_cache.init_cache(CFG, batch=2, max_len=5, per_layer=True)
  assert len(per_layer.k) == len(per_layer.v) == 3
  assert all(k.shape == (4, 5, 4) and k.dtype == jnp.bfloat16 for k in per_layer.k)


def test_write_puts_row_b_head_n_at_b_times_kv_heads_plus_n():
  """Keys [B, T, KVH, K] as projected land at slots [index, index + T) of row b * KVH + n,
  in the cache's dtype; the other slots keep what they held."""
  cache = jnp.full((2 * 2, 6, 4), -1.0, jnp.bfloat16)
  new = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)  # B=2, T=3
  out = np.asarray(kv_cache.write(cache, jnp.asarray(new), jnp.asarray(2)), np.float32)
  for b in range(2):
    for n in range(2):
      np.testing.assert_array_equal(out[b * 2 + n, 2:5], new[b, :, n])
  assert np.all(out[:, :2] == -1) and np.all(out[:, 5:] == -1)
  assert kv_cache.write(cache, jnp.asarray(new), 2).dtype == jnp.bfloat16
