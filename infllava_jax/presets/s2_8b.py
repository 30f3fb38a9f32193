"""LLaVA-1.5 with S2 (Scaling on Scales): CLIP-ViT-L/14-336 at 336, 672 and 1008 px + LLaMA-3-8B.

The `s2` variant of `infllava_8b` (the S2 procedure: infllava_jax/model/s2.py): 576 visual
tokens of 3 x 1024 channels, a projector 3072 wide at its input, images preprocessed to 1008
px. LLaVA-1.5-S2 release folders (config.json `s2: true`) convert with `--config s2_8b`; the
stage-2 recipe on it is `infllava_8b_stage2:s2`.
"""

from ml_collections import ConfigDict

from infllava_jax.presets import infllava_8b


def get_config(arg: str = "") -> ConfigDict:
  del arg
  return infllava_8b.get_config("s2")
