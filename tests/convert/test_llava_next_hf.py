"""llava-hf LlavaNextForConditionalGeneration -> the llava_next (AnyRes) variant and back:
logits match HF (1e-4, float32) per image shape and for a batch mixing them, greedy
generation gives HF `generate`'s tokens, and `to-pytorch` writes a folder HF loads."""

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from infllava_jax import generate
from infllava_jax.checkpoints import converted as converted_format
from infllava_jax.config import load_config
from infllava_jax.convert import cli
from infllava_jax.data import anyres as anyres_data
from infllava_jax.model import anyres, infllava
from tests.convert import tiny_checkpoints as tc

LOGITS_TOL = 1e-4
IMAGE_TOKEN = 500
# (height, width) at the tiny tile of 84 px. Grids (rows x cols, kept feature rows x cols of
# 6-patch tiles): square 2x2 (12x12), wide 2x2 (8x12: 2 padding rows cut above and below),
# tall 2x2 (12x8), small 1x2 (6x10), panorama 1x3 (6x18).
SIZES = {"square": (100, 100), "wide": (90, 150), "tall": (150, 90), "small": (20, 30),
         "panorama": (60, 200)}
# Every row has this many tokens (two images' slots fit): one compiled program per batch shape.
LENGTH = 400


def _images():
  rng = np.random.default_rng(0)
  return {name: Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
          for name, size in SIZES.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava_next_hf")
  model_cfg = load_config("configs/tiny.py:llava_next").model
  hf_model = tc.write_llava_next_hf(str(root / "hf"), model_cfg, IMAGE_TOKEN)
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py:llava_next",
                   "--llava-hf", str(root / "hf"), "--out", str(root / "converted")]) == 0
  return root, hf_model, *converted_format.load_converted(str(root / "converted"))


@pytest.fixture(scope="module")
def forward(converted):
  """Our logits: (tokens [B, T], pixels) -> [B, T, V], jitted once for the module."""
  model_cfg, params = converted[2:]
  apply = jax.jit(infllava.build_model(model_cfg).apply)
  return lambda tokens, pixels: np.asarray(apply({"params": params},
                                                 tokens.astype(np.int32), pixels)[0])


@pytest.fixture(scope="module")
def hf_processor():
  from transformers.models.llava_next.image_processing_pil_llava_next import (
      LlavaNextImageProcessorPil)
  cfg = load_config("configs/tiny.py:llava_next").model
  return LlavaNextImageProcessorPil(
      size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84},
      image_grid_pinpoints=[list(p) for p in cfg.anyres.grid_pinpoints])


def _tokens(counts, rng, text=4):
  """Rows of `text` ids, an image's slots, then ids up to LENGTH."""
  tokens = rng.integers(0, IMAGE_TOKEN, (len(counts), LENGTH))
  for row, n in enumerate(counts):
    tokens[row, text:text + n] = IMAGE_TOKEN
  return tokens


def _hf_logits(hf_model, tokens, batch):
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(tokens),
                    pixel_values=torch.from_numpy(batch["pixel_values"]),
                    image_sizes=torch.from_numpy(batch["image_sizes"])).logits.numpy()


def _ours(model_cfg, image_list):
  pixels, counts = anyres_data.image_inputs(image_list, model_cfg)
  return {k: v[:, None] for k, v in pixels.items()}, counts


def test_config_is_llava_next_with_the_checkpoints_fields(converted):
  _, _, model_cfg, params = converted
  assert model_cfg.variant == "llava_next" and model_cfg.image_token_id == IMAGE_TOKEN
  assert anyres.pinpoints(model_cfg) == ((84, 168), (168, 84), (168, 168), (252, 84),
                                         (84, 252))
  assert params["image_newline"].shape == (model_cfg.llm.width,)


@pytest.mark.parametrize("names", [["square"], ["wide"], ["tall"], ["small"], list(SIZES)])
def test_logits_match_hf(converted, forward, hf_processor, names):
  _, hf_model, model_cfg, _ = converted
  images = _images()
  image_list = [images[n] for n in names]
  pixels, counts = _ours(model_cfg, image_list)
  tokens = _tokens(counts, np.random.default_rng(len(names)))
  want = _hf_logits(hf_model, tokens, hf_processor(images=image_list, return_tensors="np"))
  np.testing.assert_allclose(forward(tokens, pixels), want, atol=LOGITS_TOL, rtol=0)


def test_two_images_in_a_row_fill_their_slots_in_order(converted, forward):
  model_cfg = converted[2]
  images = _images()
  pixels, counts = anyres_data.image_inputs([images["wide"], images["tall"]], model_cfg)
  tokens = _tokens([sum(counts)], np.random.default_rng(1))
  both = forward(tokens, {k: v[None] for k, v in pixels.items()})
  # The first image alone gives the same logits up to the end of its slots (causal) ...
  first = 4 + counts[0]
  alone = forward(tokens, {k: v[None, :1] for k, v in pixels.items()})
  np.testing.assert_allclose(both[:, :first], alone[:, :first], atol=1e-5, rtol=0)
  # ... and the second image's slots then hold the tall image, not the wide one again.
  assert np.abs(both[:, first:] - alone[:, first:]).max() > 1e-3
  swapped = forward(tokens, {k: v[None, ::-1] for k, v in pixels.items()})
  assert np.abs(both[:, :first] - swapped[:, :first]).max() > 1e-3


@pytest.mark.parametrize("name", ["wide", "small"])
def test_greedy_generation_matches_hf_generate(converted, hf_processor, name):
  _, hf_model, model_cfg, params = converted
  image = _images()[name]
  pixels, counts = _ours(model_cfg, [image])
  tokens = _tokens(counts, np.random.default_rng(7))
  batch = hf_processor(images=[image], return_tensors="pt")
  with torch.no_grad():
    want = hf_model.generate(input_ids=torch.from_numpy(tokens), attention_mask=torch.ones(
        tokens.shape, dtype=torch.long), pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"], max_new_tokens=8, do_sample=False,
        eos_token_id=None, pad_token_id=0).numpy()[:, tokens.shape[1]:]
  model, decode_params = generate.for_decoding(infllava.build_model(model_cfg), params)
  run = generate.compiled_generate(model, generate.Sampling(max_new_tokens=8), pad_id=0)
  got, _ = run(decode_params, tokens.astype(np.int32), np.ones(tokens.shape, np.int32), pixels,
               jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_to_pytorch_writes_a_folder_transformers_loads(converted, hf_processor):
  root, hf_model, model_cfg, _ = converted
  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(root / "converted"),
                   "--out", str(root / "exported")]) == 0
  exported = transformers.LlavaNextForConditionalGeneration.from_pretrained(
      str(root / "exported")).eval()
  assert exported.config.image_grid_pinpoints == [list(p) for p in
                                                  model_cfg.anyres.grid_pinpoints]
  image = _images()["wide"]
  _, counts = _ours(model_cfg, [image])
  tokens = _tokens(counts, np.random.default_rng(3))
  batch = hf_processor(images=[image], return_tensors="np")
  np.testing.assert_allclose(_hf_logits(exported, tokens, batch),
                             _hf_logits(hf_model, tokens, batch), atol=1e-6, rtol=0)
  # ... and reads back into the same params.
  assert cli.main(["from-pytorch", "--quiet", "--llava-hf", str(root / "exported"),
                   "--config", "configs/tiny.py:llava_next", "--out",
                   str(root / "reconverted")]) == 0
  again_cfg, again = converted_format.load_converted(str(root / "reconverted"))
  assert anyres.pinpoints(again_cfg) == anyres.pinpoints(model_cfg)
  np.testing.assert_array_equal(np.asarray(again["image_newline"]),
                                np.asarray(converted[3]["image_newline"]))


def test_a_baseline_config_for_a_llava_next_checkpoint_is_refused(converted, capsys):
  root = converted[0]
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py:llava",
                   "--llava-hf", str(root / "hf"), "--out", str(root / "wrong")]) == 1
  assert "is the llava_next variant; use a ':llava_next' config" in capsys.readouterr().err


def test_max_image_tokens_bounds_every_count(converted):
  model_cfg = converted[2]
  counts = [anyres.num_image_tokens(h, w, model_cfg) for h in range(10, 400, 37)
            for w in range(10, 400, 41)]
  assert max(counts) == anyres.max_image_tokens(model_cfg) == 36 + 12 * 13


def test_to_pytorch_refuses_a_model_without_an_image_token_id(tmp_path, capsys):
  from tests.random_params import random_params
  model_cfg = load_config("synthetic:anyres").model  # image slots marked -200
  converted_format.save_converted(str(tmp_path / "ckpt"), model_cfg, random_params(model_cfg))
  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(tmp_path / "ckpt"),
                   "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "model.image_token_id=-200 is not a vocabulary id" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "out").exists()
