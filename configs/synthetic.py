"""The embedded default run: the tiny model on the synthetic fine-detail set.

The package's preset `synthetic` (infllava_jax/presets/synthetic.py): `--config
configs/synthetic.py[:arg]` and `--config synthetic[:arg]` load the same config. A config of
your own can start from it: `config = get_config(arg)`, then change fields.
"""

from infllava_jax.presets.synthetic import get_config  # noqa: F401
