"""A packed row gives each of its samples the logits and loss that sample gets alone."""

import jax
import numpy as np

from infllava_jax.config import load_config
from infllava_jax.data import pipeline
from infllava_jax.model import infllava
from infllava_jax.training import optim


def test_packed_row_matches_samples_alone():
  cfg = load_config("configs/synthetic.py", [
      "--config.data.synthetic.num_train=16", "--config.data.synthetic.image_size=252",
      "--config.data.batch_size=2", "--config.data.max_length=256",
      "--config.data.packing=True", "--config.data.max_images_per_row=3",
      "--config.data.shuffle=False"])
  model = infllava.build_model(cfg.model)
  params = model.init(jax.random.key(0), *infllava.dummy_inputs(cfg.model))["params"]
  apply = jax.jit(lambda *a: model.apply({"params": params}, *a)[0])
  n_img = infllava.num_image_tokens(cfg.model)
  batch = next(pipeline.make_iterator(cfg, process_index=0, process_count=1))

  checked = 0
  for row in range(batch["tokens"].shape[0]):
    segments = batch["segment_ids"][row]
    assert segments.max() >= 2, "the packer should fit several samples in a 256-token row"
    packed = apply(batch["tokens"][row:row + 1], batch["pixels"][row:row + 1],
                   batch["positions"][row:row + 1], batch["segment_ids"][row:row + 1])[0]
    image = 0
    for seg in range(1, segments.max() + 1):
      where = np.flatnonzero(segments == seg)
      tokens = batch["tokens"][row, where]
      has_image = bool((tokens == cfg.model.image_token_id).any())
      pixels = batch["pixels"][row:row + 1, image:image + 1]
      assert (tokens == cfg.model.image_token_id).sum() == n_img * has_image
      alone = apply(tokens[None], pixels, batch["positions"][row, where][None],
                    np.ones((1, where.size), np.int32))[0]
      np.testing.assert_allclose(packed[where], alone, atol=1e-5, rtol=1e-5)
      targets, mask = batch["targets"][row, where], batch["loss_mask"][row, where]
      loss_packed = optim.token_mean_loss(packed[where][None], targets[None], mask[None])
      loss_alone = optim.token_mean_loss(alone[None], targets[None], mask[None])
      np.testing.assert_allclose(loss_packed, loss_alone, rtol=1e-6)
      image += has_image
      checked += 1
  assert checked >= 4
