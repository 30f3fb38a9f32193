"""The released INF-LLaVA model: CLIP-ViT-L/14-336 seen at 1008 px on a 3x3 grid + LLaMA-3-8B.

The package's preset `infllava_8b` (infllava_jax/presets/infllava_8b.py): `--config
configs/infllava_8b.py[:arg]` and `--config infllava_8b[:arg]` load the same config. A config
of your own can start from it: `config = get_config(arg)`, then change fields.
"""

from infllava_jax.presets.infllava_8b import get_config  # noqa: F401
