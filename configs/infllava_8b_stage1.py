"""Stage 1 (alignment) of the released INF-LLaVA-8B: DEM + projector trained on LAION/CC/SBU captions.

The package's preset `infllava_8b_stage1` (infllava_jax/presets/infllava_8b_stage1.py):
`--config configs/infllava_8b_stage1.py[:arg]` and `--config infllava_8b_stage1[:arg]` load the
same config. A config of your own can start from it: `config = get_config(arg)`, then change
fields.
"""

from infllava_jax.presets.infllava_8b_stage1 import get_config  # noqa: F401
