"""Building blocks shared by the towers: dense layers with logical axes, norms, activations.

Every parameter is created through `param_with_axes`-style initialisers wrapped by
`nn.with_logical_partitioning`, so `infllava_jax.sharding` can place it by name alone.
Kernels are 2-D `[in, out]` (heads fused into one axis): one matmul per projection, which
XLA tiles well on every backend, and a PyTorch `Linear.weight` maps to it by a transpose.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtype_of(name: str | Dtype) -> Dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  return jnp.dtype(name) if isinstance(name, str) else name


def compute_platform() -> str:
  """"cpu", "gpu" or "tpu": the platform of the mesh in context (`jax.set_mesh`), else the
  default backend. A TPU compile from a CPU host (`infllava compile --topology`) sets a TPU
  mesh while the default backend stays CPU."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def torch_linear_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias.

  The DEM and the projector start from it in stage 1 (docs/fidelity.md#module-init).
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """`y = x @ kernel + bias` over the last axis, with logical axis names on the kernel.

  Attributes:
    features: output width.
    axes: logical names of the kernel's (in, out) axes; the bias takes `axes[1]`.
    kernel_init, bias_init: initialisers (default: normal(0.02), zeros, as HF does).
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.normal(0.02)
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def torch_dense(features: int, fan_in: int, axes, **kwargs) -> Dense:
  """A `Dense` initialised like PyTorch's `nn.Linear` (weight and bias uniform)."""
  init = torch_linear_init(fan_in)
  return Dense(features, axes, kernel_init=init, bias_init=init, **kwargs)


class LayerNorm(nn.Module):
  """LayerNorm with statistics in float32 and an explicit eps (PyTorch's 1e-5, not Flax's 1e-6)."""

  eps: float
  axis_name: str | None = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (dim,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (self.axis_name,)),
                      (dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: float32 statistics, the weight applied after casting back (as HF does)."""

  eps: float
  axis_name: str | None = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# PyTorch's nn.GELU() is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
exact_gelu = functools.partial(jax.nn.gelu, approximate=False)


def remat_policy(name: str):
  """The checkpoint policy named in `config.model.remat_policy`; KeyError lists the choices."""
  try:
    return REMAT_POLICIES[name]
  except KeyError:
    raise KeyError(f"model.remat_policy={name!r}; expected one of {sorted(REMAT_POLICIES)}")


def scan_layers(block: type[nn.Module], *, length: int, remat: str,
                in_axes: Sequence[Any] = (), out_axes: Any = 0) -> type[nn.Module]:
  """Wraps a layer `block(carry, *xs) -> (carry, y)` for `length` repeats under `nn.scan`.

  Params get a leading `layers` axis and XLA compiles the block once, so an 8B model
  compiles in seconds. `remat` names a policy of `REMAT_POLICIES` ("none" keeps every
  activation). `in_axes`: one entry per extra argument (`nn.broadcast` or a scanned axis).
  """
  if remat != "none":
    block = nn.remat(block, policy=remat_policy(remat), prevent_cse=False)
  # A dropout rng (LoRA's) differs per layer, as the params' init does.
  return nn.scan(block, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=tuple(in_axes), out_axes=out_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})
