"""Stage 2 (instruction tuning) of the released INF-LLaVA-8B: DEM + projector + the whole LLM.

The package's preset `infllava_8b_stage2` (infllava_jax/presets/infllava_8b_stage2.py):
`--config configs/infllava_8b_stage2.py[:arg]` and `--config infllava_8b_stage2[:arg]` load the
same config. A config of your own can start from it: `config = get_config(arg)`, then change
fields.
"""

from infllava_jax.presets.infllava_8b_stage2 import get_config  # noqa: F401
