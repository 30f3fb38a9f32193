"""AnyRes processing: parity with transformers' LlavaNextImageProcessor (PIL path) and the
token count of LlavaNextProcessor / the grid and unpadding of LlavaNextForConditionalGeneration."""

import functools
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_next import modeling_llava_next, processing_llava_next

from infllava_jax.data import anyres as anyres_data
from infllava_jax.model import anyres
from infllava_jax.presets import infllava_8b

# (height, width): square, wide, tall, small (upscaled into a grid), odd ratios.
SIZES = [(500, 500), (300, 900), (1000, 400), (40, 60), (333, 667), (768, 1024), (1234, 250)]


@pytest.fixture(scope="module")
def model_cfg():
  return infllava_8b.model_config("llava_next")


@pytest.fixture(scope="module")
def hf_processor(model_cfg):
  from transformers.models.llava_next.image_processing_pil_llava_next import (
      LlavaNextImageProcessorPil)
  return LlavaNextImageProcessorPil(
      size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
      image_grid_pinpoints=[list(p) for p in model_cfg.anyres.grid_pinpoints])


def _image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("height, width", SIZES[:5])
def test_tiles_match_llava_next_image_processor(model_cfg, hf_processor, height, width):
  image = _image(height, width, seed=height * width)
  tiles, layout = anyres_data.preprocess(image, model_cfg)
  want = hf_processor(images=image, return_tensors="np")["pixel_values"][0]
  assert tiles.dtype == np.float32
  assert tiles.shape == (want.shape[0], 336, 336, 3)
  assert want.shape[0] == 1 + layout.rows * layout.cols
  np.testing.assert_allclose(tiles, want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_image_inputs_pad_to_the_largest_grid(model_cfg, hf_processor):
  batch = [_image(*size, seed=i) for i, size in enumerate(SIZES[:4])]
  pixels, counts = anyres_data.image_inputs([batch[0], None, *batch[1:]], model_cfg)
  want = hf_processor(images=batch, return_tensors="np")["pixel_values"]  # padded with zeros
  assert pixels["tiles"].shape == (5, 1 + anyres.max_tiles(model_cfg), 336, 336, 3)
  got = pixels["tiles"][[0, 2, 3, 4]].transpose(0, 1, 4, 2, 3)
  np.testing.assert_allclose(got[:, :want.shape[1]], want, atol=1e-5, rtol=0)
  assert not got[:, want.shape[1]:].any()
  assert counts[1] == 0 and not pixels["layout"][1].any()
  assert counts == [anyres.count(anyres.Layout(*map(int, r)), model_cfg)
                    for r in pixels["layout"]]


def _sizes(n=400, seed=0):
  rng = np.random.default_rng(seed)
  return [(int(h), int(w)) for h, w in rng.integers(8, 2500, (n, 2))] + SIZES


def test_grid_choice_matches_transformers(model_cfg):
  points = [list(p) for p in model_cfg.anyres.grid_pinpoints]
  for height, width in _sizes():
    assert anyres.select_best_resolution(height, width, anyres.pinpoints(model_cfg)) == \
        tuple(hf_select((height, width), points)), (height, width)


def test_token_count_matches_the_processor_and_the_model(model_cfg):
  points = [list(p) for p in model_cfg.anyres.grid_pinpoints]
  cls = processing_llava_next.LlavaNextProcessor
  fake = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=points),
                               patch_size=14, num_additional_image_tokens=1)
  fake._get_unpadded_features = functools.partial(cls._get_unpadded_features, fake)
  for height, width in _sizes():
    layout = anyres.layout(height, width, model_cfg)
    # LlavaNextProcessor with vision_feature_select_strategy="default" (CLS dropped).
    want = cls._get_number_of_features(fake, height, width, 336, 336) - 1
    assert anyres.num_image_tokens(height, width, model_cfg) == want, (height, width)
    rows, cols = modeling_llava_next.get_anyres_image_grid_shape((height, width), points, 336)
    unpadded = modeling_llava_next.unpad_image(torch.zeros(1, rows * 24, cols * 24),
                                               (height, width))
    assert layout == (rows, cols, *unpadded.shape[1:]), (height, width)


def test_largest_image_gives_2928_tokens(model_cfg):
  assert anyres.max_tiles(model_cfg) == 4
  assert anyres.max_image_tokens(model_cfg) == 576 + 48 * 49 == 2928
  assert anyres.num_image_tokens(1000, 1000, model_cfg) == 2928


def test_bad_pinpoints_are_named(model_cfg):
  cfg = model_cfg.copy_and_resolve_references()
  cfg.anyres.grid_pinpoints = ((336, 500),)
  with pytest.raises(ValueError, match=r"grid_pinpoints.*multiples of vision.image_size 336"):
    anyres.pinpoints(cfg)


def _wide_tall_json(tmp_path):
  """A LLaVA JSON of images of several aspect ratios and one text-only record."""
  import json
  from infllava_jax.data import sources
  sizes = [(60, 200), (150, 90), (100, 100), (20, 30)]
  records = []
  for i, (height, width) in enumerate(sizes):
    _image(height, width, seed=i).save(tmp_path / f"{i}.png")
    records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
        {"from": "gpt", "value": "A pattern " * (i + 1)}]})
  records.append({"id": "txt", "conversations": [{"from": "human", "value": "Hello?"},
                                                 {"from": "gpt", "value": "Hi."}]})
  (tmp_path / "mix.json").write_text(json.dumps(records))
  return sources.LlavaJsonSource(str(tmp_path / "mix.json"), str(tmp_path)), sizes


@pytest.mark.parametrize("packing", [False, True])
def test_pipeline_gives_each_image_its_own_slots(tmp_path, packing):
  from infllava_jax.config import load_config
  from infllava_jax.data import pipeline
  overrides = dict(batch_size=2, max_length=600, shuffle=False, packing=packing,
                   max_images_per_row=2 if packing else 1)
  config = load_config("synthetic:anyres", [f"--config.data.{k}={v}"
                                            for k, v in overrides.items()])
  source, sizes = _wide_tall_json(tmp_path)
  want = sorted(anyres.num_image_tokens(h, w, config.model) for h, w in sizes)
  assert len(set(want)) == 4  # every image its own count
  got = []
  for batch in pipeline.make_iterator(config, source, process_index=0, process_count=1,
                                      num_epochs=1):
    pixels = batch["pixels"]
    assert pixels["tiles"].shape[2:] == (1 + anyres.max_tiles(config.model), 84, 84, 3)
    for row in range(len(batch["tokens"])):
      counts = [anyres.count(anyres.Layout(*map(int, l)), config.model)
                for l in pixels["layout"][row]]
      assert (batch["tokens"][row] == config.model.image_token_id).sum() == sum(counts)
      got += [c for c in counts if c]
      for image, count in enumerate(counts):  # an absent image's tiles are zeros
        assert pixels["tiles"][row, image].any() == bool(count)
  assert sorted(got) == want
