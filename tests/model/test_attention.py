"""Attention kernels and the choice among them: splash (Pallas interpreter) against our
einsum attention, the unmasked kernels against each other, and `resolve_attention_impl`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import sharding
from infllava_jax.convert.llama_table import llama_config_from_hf
from infllava_jax.model import attention, layers, llama
from tests.model.test_llama import hf_config_dict


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_splash_attention_equals_grouped_attention():
  """The TPU splash kernel (run in the Pallas interpreter) against our einsum attention:
  GQA, a row of two packed segments and a left-padded row; values and gradients, on one
  device and under a (data=2, fsdp=2, tensor=2) mesh through its shard_map."""
  b, t, h, n, d = 4, 256, 4, 2, 64
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
             for heads in (h, n, n))
  segments = np.ones((b, t), np.int32)
  segments[0, 100:] = 2   # packed
  segments[1, :30] = 0    # left padding
  segments = jnp.asarray(segments)
  mask = attention.attention_mask(segments, segments, jnp.arange(t), jnp.arange(t))
  scale = d ** -0.5
  weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)

  def with_grads(attend):
    out = attend(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(attend(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    return out, grads

  want = with_grads(lambda q, k, v: attention.grouped_attention(q, k, v, mask, scale))
  splash = lambda q, k, v: attention.splash_attention(q, k, v, segments, scale, interpret=True)
  got = with_grads(splash)
  with jax.set_mesh(sharding.make_mesh("data=2,fsdp=2,tensor=2")), sharding.axis_rules():
    got_sharded = jax.jit(lambda: with_grads(splash))()
  for result in (got, got_sharded):
    errs = jax.tree_util.tree_map(max_err, result, want)
    assert max(jax.tree_util.tree_leaves(errs)) <= 1e-5
  # The segments matter: one segment per row gives other values.
  assert max_err(attention.splash_attention(q, k, v, jnp.ones_like(segments), scale,
                                            interpret=True), want[0]) > 0.1
  # The default off TPU: our einsum path.
  assert not attention.uses_splash(attention.resolve_attention_impl(None, "cpu"), t)


def test_resolve_attention_impl_by_platform():
  """None picks by platform, an explicit choice wins everywhere, and splash runs where
  its blocks divide the length; a bad name is named."""
  assert [attention.resolve_attention_impl(None, p) for p in ("cpu", "gpu", "tpu")] == [
      "einsum", "jax", "splash"]
  for impl in ("einsum", "xla", "cudnn"):
    assert {attention.resolve_attention_impl(impl, p) for p in ("cpu", "gpu", "tpu")} == {impl}
  assert attention.uses_splash("splash", 2048) and attention.uses_splash("splash", 256)
  assert not attention.uses_splash("splash", 100)        # no 128-multiple block divides it
  assert not attention.uses_splash("splash", 640 + 128)  # 512 does not divide 768
  assert not attention.uses_splash("einsum", 2048)       # an explicit choice wins
  with pytest.raises(ValueError, match=r"model.attention_impl='flash'; expected None, "
                     r"'einsum', 'xla' or 'cudnn'"):
    attention.resolve_attention_impl("flash", "cpu")


def test_attention_dispatch_follows_the_mesh_platform():
  """A TPU compile from a CPU host (`infllava compile --topology`) sets a TPU mesh while
  jax's default backend stays CPU: the LLM's kernel, chosen in its setup at trace time,
  must follow the mesh, not the backend."""
  from jax._src.mesh import AbstractDevice  # no public constructor for a foreign device
  tpu = jax.sharding.AbstractMesh(
      (2,), ("fsdp",),
      abstract_device=AbstractDevice(device_kind="TPU v5p", num_cores=None, platform="tpu"))
  llm = llama.Llama(llama_config_from_hf(hf_config_dict(new_spelling=True)))
  assert layers.compute_platform() == jax.default_backend() == "cpu"
  assert llm.bind({}).attention_kernel == "einsum"
  with jax.sharding.use_abstract_mesh(tpu):
    assert layers.compute_platform() == "tpu"
    assert llm.bind({}).attention_kernel == "splash"
    assert llm.clone(attention_impl="einsum").bind({}).attention_kernel == "einsum"


def test_unmasked_kernels_agree():
  """CLIP's and the DEM's unmasked attention: our einsums (also what "splash" runs) and
  jax's own pick equal `jax.nn.dot_product_attention`'s XLA form; queries and keys of
  different lengths (the DEM's cross-attention)."""
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 5, 4, 8), np.float32)       # [N, Tq, H, K]
  k, v = rng.standard_normal((2, 2, 7, 4, 8), np.float32)  # [N, Tk, H, K]
  run = jax.jit(attention.unmasked_attention, static_argnums=3)
  want = run(q, k, v, "xla")
  for kernel in ("einsum", "jax", "splash"):
    np.testing.assert_allclose(run(q, k, v, kernel), want, rtol=0, atol=1e-5)
