"""A llava_next (AnyRes) model through the inference API and `infllava generate`: each image
gets its own number of slots, rows of several aspect ratios share one batch."""

import numpy as np
import pytest
from PIL import Image

from infllava_jax import generate
from infllava_jax.config import load_config
from infllava_jax.inference import Assistant
from infllava_jax.model import anyres
from tests.random_params import random_params
from tests.run_cli import infllava


@pytest.fixture(scope="module")
def config():
  return load_config("synthetic:anyres")


@pytest.fixture(scope="module")
def assistant(config):
  return Assistant(config, random_params(config.model, std=0.5))


def _image(height, width, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_prompt_slots_follow_the_images_size(assistant, config):
  wide, tall = _image(60, 200, 0), _image(150, 90, 1)
  slots = lambda image: assistant.prompt("What is it?", image=image).count(
      config.model.image_token_id)
  assert slots(wide) == anyres.num_image_tokens(60, 200, config.model) == 150
  assert slots(tall) == anyres.num_image_tokens(150, 90, config.model) == 144
  assert config.model.image_token_id not in assistant.prompt("Hi?", has_image=False)
  with pytest.raises(ValueError, match="depend on the image's size"):
    assistant.prompt("What is it?")


def test_a_batch_of_aspect_ratios_answers_as_each_row_alone(assistant):
  images = [_image(60, 200, 0), _image(150, 90, 1), None]
  questions = ["What is it?", "And this?", "Hello?"]
  sampling = generate.Sampling(max_new_tokens=6)
  batch = assistant.generate_batch(images, questions, sampling=sampling)
  assert len({a.prompt_tokens for a in batch}) == 3
  # The image rows alone (one compiled program: their prompts share a length bucket).
  for image, question, answer in zip(images[:2], questions, batch):
    alone = assistant.generate_batch([image], [question], sampling=sampling)[0]
    assert alone.token_ids == answer.token_ids
    assert alone.prompt_tokens == answer.prompt_tokens


def test_generate_cli_answers_about_a_wide_image(config, tmp_path):
  from infllava_jax.checkpoints import converted
  path = str(tmp_path / "ckpt")
  converted.save_converted(path, config.model, random_params(config.model))
  _image(50, 300, 3).save(tmp_path / "wide.png")
  done = infllava("generate", "--checkpoint", path, "--image", tmp_path / "wide.png",
                  "--prompt", "What is it?", "--max-new-tokens", "4")
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("Q: What is it?\nA:")
  assert "(llava_next, float32)" in done.stderr


def test_generation_compiles_ahead_of_time_with_the_largest_image():
  import jax
  from infllava_jax import inference_compile
  config = load_config("configs/tiny.py:llava_next", ["--config.model.dtype=bfloat16"])
  run = inference_compile.compile_generation(config, jax.devices()[0], 1, 256, 16, None,
                                             log=lambda _: None)
  bound = dict(run["bound"])
  inputs = next(b for label, b in bound.items() if label.startswith("inputs"))
  tiles = (1 + anyres.max_tiles(config.model)) * 84 * 84 * 3 * 4  # float32, one image
  assert inputs >= tiles and run["memory"]["arguments"] >= inputs
  with pytest.raises(ValueError, match=r"the image alone takes 192"):
    inference_compile.compile_generation(config, jax.devices()[0], 1, 192, 16, None,
                                         log=lambda _: None)
