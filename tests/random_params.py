"""Random params of a model config's shapes, for tests: shapes from `eval_shape` (nothing is
initialised or compiled, cheaper than `model.init` on two shared cores), values from numpy."""

import flax.linen as nn
import jax
import numpy as np

from infllava_jax.model import infllava


def random_params(model_cfg, seed: int = 0, std: float = 0.02, unit_scales: bool = True) -> dict:
  """Normal(0, std) numpy params of `InfLlava(model_cfg)`; norm scales all ones when
  `unit_scales` (a model that behaves like a trained one's layer norms)."""
  model = infllava.build_model(model_cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               *infllava.dummy_inputs(model_cfg)))
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    if unit_scales and "scale" in jax.tree_util.keystr(path[-1:]):
      return np.ones(a.shape, a.dtype)
    return (rng.normal(size=a.shape) * std).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract["params"]))
