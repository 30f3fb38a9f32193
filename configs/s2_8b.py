"""LLaVA-1.5 with S2 (Scaling on Scales): CLIP-ViT-L/14-336 at 336, 672 and 1008 px + LLaMA-3-8B.

The package's preset `s2_8b` (infllava_jax/presets/s2_8b.py): `--config configs/s2_8b.py` and
`--config s2_8b` load the same config. A config of your own can start from it: `config =
get_config(arg)`, then change fields.
"""

from infllava_jax.presets.s2_8b import get_config  # noqa: F401
