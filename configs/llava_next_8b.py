"""LLaVA-NeXT (AnyRes) on INF-LLaVA's towers, the llama3-llava-next-8b layout.

The package's preset `llava_next_8b` (infllava_jax/presets/llava_next_8b.py): `--config
configs/llava_next_8b.py[:arg]` and `--config llava_next_8b[:arg]` load the same config. A
config of your own can start from it: `config = get_config(arg)`, then change fields.
"""

from infllava_jax.presets.llava_next_8b import get_config  # noqa: F401
