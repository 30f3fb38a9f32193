"""The vision-language projector, LLaVA-1.5's `mlp2x_gelu` (docs/fidelity.md#projector)."""

from __future__ import annotations

import jax
import flax.linen as nn

from infllava_jax.model import layers


class Projector(nn.Module):
  """`fc2(gelu_exact(fc1(v)))`: [B, N, Dv] -> [B, N, D].

  Initialised like PyTorch's `nn.Linear` (docs/fidelity.md#module-init): stage 1 trains it from scratch.
  """

  width: int
  kind: str = "mlp2x_gelu"
  dtype: layers.Dtype = "float32"
  param_dtype: layers.Dtype = "float32"

  @nn.compact
  def __call__(self, visual: jax.Array) -> jax.Array:
    if self.kind != "mlp2x_gelu":
      raise ValueError(f"model.projector.kind={self.kind!r}; only 'mlp2x_gelu' is implemented")
    dtypes = dict(dtype=layers.dtype_of(self.dtype), param_dtype=layers.dtype_of(self.param_dtype))
    hidden = layers.torch_dense(self.width, visual.shape[-1], ("vision_embed", "mlp"),
                                name="fc1", **dtypes)(visual)
    hidden = layers.exact_gelu(hidden)
    return layers.torch_dense(self.width, self.width, ("mlp", "embed"), name="fc2",
                              **dtypes)(hidden)
