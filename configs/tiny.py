"""A test-size INF-LLaVA: the released architecture, shrunk (3x3 grid, 6x6 patches per view).

The package's preset `tiny` (infllava_jax/presets/tiny.py): `--config configs/tiny.py[:arg]`
and `--config tiny[:arg]` load the same config. A config of your own can start from it: `config
= get_config(arg)`, then change fields.
"""

from infllava_jax.presets.tiny import get_config  # noqa: F401
