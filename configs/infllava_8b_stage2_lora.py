"""Stage 2 of INF-LLaVA-8B with LoRA (the reference's `lora_enable`): adapters on the LLM's
linear layers, the DEM and projector in full; optionally a quantised frozen base (QLoRA).

The package's preset `infllava_8b_stage2_lora` (infllava_jax/presets/infllava_8b_stage2_lora.py):
`--config configs/infllava_8b_stage2_lora.py` and `--config infllava_8b_stage2_lora` load the
same config.
"""

from infllava_jax.presets.infllava_8b_stage2_lora import get_config  # noqa: F401
