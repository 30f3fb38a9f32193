"""A test-size INF-LLaVA: the released architecture, shrunk (3x3 grid, 6x6 patches per view).

`get_config("llava")` gives the baseline variant at the same size, `get_config("llava_next")`
LLaVA-NeXT's AnyRes on the same towers (grids of 84 px tiles), `get_config("s2")` S2.
"""

from ml_collections import ConfigDict

from infllava_jax.presets import infllava_8b


def model_config(variant: str = "infllava") -> ConfigDict:
  model = infllava_8b.model_config(variant)
  model.vision.update(dict(image_size=84, patch_size=14, width=64, depth=3, heads=4,
                           mlp_dim=128))
  model.llm.update(dict(vocab_size=512, width=64, depth=2, heads=4, kv_heads=2,
                        head_dim=16, mlp_dim=128, max_positions=2048))
  if variant == "infllava":
    model.dcm.image_size = 252
  else:
    model.dcm.image_size = 84
  if variant == "s2":
    model.s2.scales = (84, 168, 252)  # 1 + 4 + 9 tiles of 84 px, as 336/672/1008
  model.dem.heads = 4
  if variant == "llava_next":  # the 8B's grids in tiles of 84 px
    model.anyres.grid_pinpoints = tuple((h // 4, w // 4) for h, w in
                                        model.anyres.grid_pinpoints)
  model.dtype = "float32"
  return model


def get_config(arg: str = "infllava") -> ConfigDict:
  config = ConfigDict()
  config.model = model_config(arg or "infllava")
  return config
