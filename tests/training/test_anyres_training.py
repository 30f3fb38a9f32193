"""The llava_next (AnyRes) variant trains: the synthetic preset's `:anyres` through the real
trainer (pipeline, sharded step, optimiser), its loss finite and its FLOPs counted per tile."""

import jax
import numpy as np

from infllava_jax.config import load_config
from infllava_jax.model import anyres
from infllava_jax.training import flops, loop

TINY = ["--config.model.vision.depth=1", "--config.model.llm.depth=1",
        "--config.data.synthetic.num_train=16", "--config.data.batch_size=2",
        "--config.data.max_length=256", "--config.data.read_threads=1",
        "--config.train.steps=3", "--config.train.log_every=1",
        "--config.eval.heldout_examples=0", "--config.checkpoint.async_save=false"]


def test_synthetic_anyres_trains_a_few_steps(tmp_path):
  config = load_config("synthetic:anyres", TINY)
  trainer = loop.Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  losses = []
  trainer.run(on_metrics=lambda step, m: losses.append(m["loss"]))
  assert len(losses) == 3 and np.isfinite(losses).all()
  # The ViT runs on the base view and every tile slot (4 here: padding tiles included).
  assert anyres.max_tiles(config.model) == 4
  one_view = config.model.copy_and_resolve_references()
  one_view.variant = "llava"
  assert flops.vit_forward_flops(config.model)[0] == 5 * flops.vit_forward_flops(one_view)[0]
