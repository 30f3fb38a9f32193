"""LLaVA-1.5 with S2 (Scaling on Scales): CLIP-ViT-L/14-336 at 336, 672 and 1008 px + LLaMA-3-8B.

The package's preset `infllava_8b` with arg `s2` (infllava_jax/presets/infllava_8b.py; the
procedure: infllava_jax/model/s2.py): `--config configs/s2_8b.py` and `--config infllava_8b:s2`
load the same config. A config of your own can start from it: `config = get_config()`, then
change fields.
"""

from infllava_jax.presets.infllava_8b import get_config as _released


def get_config(arg: str = ""):
  del arg
  return _released("s2")
