"""Weight-only int8 / int4 / nf4 inference through qwix (`infllava_jax.quantize`): which params
are quantised, greedy answers against the float model's, saving and loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from flax.traverse_util import flatten_dict

from infllava_jax import generate, quantize
from infllava_jax.config import load_config
from infllava_jax.checkpoints import converted
from infllava_jax.data import synthetic as synthetic_data
from infllava_jax.evaluate import synthetic
from infllava_jax.inference import Assistant
from infllava_jax.training import loop
from tests.random_params import random_params
from tests.run_cli import error_line, infllava


def test_rules_pick_the_llms_linear_kernels_by_path():
  how = quantize.how_to_quantize
  # int8: one scale per output channel (and per layer when scanned); the input axis reduced.
  scanned = how("llm/layers/mlp/down/kernel", (2, 256, 64), "int8")
  assert (tuple(scanned.channelwise_axes), scanned.tiled_axes) == ((0, 2), {})
  # 4-bit: groups of 128 input rows, or one group when there are fewer.
  assert how("llm/layers_1/attn/q/kernel", (256, 64), "int4").tiled_axes == {0: 128}
  assert how("llm/layers_1/attn/q/kernel", (64, 64), "nf4").tiled_axes == {0: 64}
  assert how("layers_0/mlp/gate/kernel", (64, 96), "int4", group_size=32).tiled_axes == {0: 32}
  for path in ("llm/lm_head/kernel", "llm/embed/embedding", "vision/layers/attn/q/kernel",
               "projector/fc1/kernel", "dem/fuse/kernel", "llm/layers_0/attn_norm/scale"):
    assert how(path, (64, 64), "int8") is None, path
  with pytest.raises(ValueError, match="llm/layers_0/mlp/down/kernel: 192 input rows are not "
                                       "a multiple of the quantisation group size 128"):
    how("llm/layers_0/mlp/down/kernel", (192, 64), "int4")
  with pytest.raises(ValueError, match="quantize='int2'; expected one of int8, int4, nf4"):
    how("llm/layers_0/mlp/down/kernel", (192, 64), "int2")


def _questions(num: int):
  """Held-out synthetic questions with their images, and two text-only ones."""
  records = list(synthetic_data.synthetic_examples("heldout", num, image_size=252))
  images = [r["image"] for r in records] + [None, None]
  questions = [r["conversations"][0]["value"].replace("<image>", "").strip()
               for r in records] + ["What is a pattern?", "Count the lines."]
  return images, questions


def _agreement(answers, reference) -> float:
  """The fraction of the reference's generated positions where `answers` hold its token."""
  same = [a == b for x, r in zip(answers, reference)
          for a, b in zip(x.token_ids + (None,) * len(r.token_ids), r.token_ids)]
  return float(np.mean(same))


def test_quantised_model_predicts_as_the_float_one_on_a_random_model():
  """A random tiny model (a trained one is the slow test below): given the same prompts
  (held-out images and questions, text-only ones), the next token the int8 model predicts
  equals the float model's at >= 99% of positions, int4's and nf4's at >= 95%. Teacher
  forced, so one early difference does not decide the later positions as in free greedy
  decoding, where a random model's near-flat logits would make that a coin toss. MLP column
  sets (a stage-2 run's config) are computed whole when quantised, the same function."""
  config = load_config("configs/tiny.py", ["--config.model.mlp_chunks=2"])
  params = random_params(config.model, std=0.05, unit_scales=False)
  images, questions = _questions(4)
  assistant = Assistant(config, params, length_bucket=1)
  tokens, mask = generate.left_pad([assistant.prompt(q, has_image=im is not None)
                                    for im, q in zip(images, questions)], 0)
  pixels = np.stack([assistant.pixels(im if im is not None else np.zeros((8, 8, 3), np.uint8))
                     for im in images])[:, None]
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

  def predictions(model, params):
    logits, _ = jax.jit(model.apply)({"params": params}, tokens, pixels, positions, mask)
    return np.asarray(jnp.argmax(logits, axis=-1))[mask == 1]

  reference = predictions(assistant.model, assistant.params)
  for mode, floor in (("int8", 0.99), ("int4", 0.95), ("nf4", 0.95)):
    model, quantised = quantize.quantize(assistant.model, assistant.params, mode)
    kernel = quantised["llm"]["layers_1"]["mlp"]["down"]["kernel"]
    assert kernel.array.qvalue.dtype == {"int8": jnp.int8, "int4": jnp.int4,
                                         "nf4": jnp.uint4}[mode]
    assert quantised["llm"]["lm_head"]["kernel"] is assistant.params["llm"]["lm_head"]["kernel"]
    agreement = np.mean(predictions(model, quantised) == reference)
    assert agreement >= floor, (mode, agreement)
  # Quantised params taken back keep their mode; another one is refused.
  assert quantize.params_mode(Assistant(config, quantised).params) == "nf4"
  with pytest.raises(ValueError, match="quantize='int8' but the params are quantised as 'nf4'"):
    Assistant(config, quantised, quantize="int8")


def test_a_quantised_checkpoint_saves_loads_and_answers_the_same(tiny_config, tmp_path):
  """`quantize.convert` writes a converted checkpoint with low-bit kernels; `from_run` loads
  it quantised and answers exactly as quantising the float params in memory does."""
  params = random_params(tiny_config.model, std=0.05, unit_scales=False)
  source = str(tmp_path / "float")
  converted.save_converted(source, tiny_config.model, params)
  images, questions = _questions(2)
  sampling = generate.Sampling(max_new_tokens=6)
  for mode, stored, groups in (("int8", "int8", 1), ("int4", "int4", 2), ("nf4", "uint8", 2)):
    out = str(tmp_path / mode)
    quantize.convert(source, out, mode, group_size=32)
    _, stored_params = converted.load_converted(out)
    assert {type(x) for x in jax.tree.leaves(stored_params)} == {np.ndarray}  # host arrays
    saved = converted.params_metadata(out)["llm"]["layers"]["attn"]["q"]["kernel"]
    assert saved["qvalue"].dtype == np.dtype(stored)
    assert saved["scale"].shape == (2, groups, 64)  # [depth, input groups, outputs]
    loaded = Assistant.from_run(out)
    assert quantize.params_mode(loaded.params) == mode
    in_memory = Assistant(tiny_config, quantize.quantize_params(params, mode, group_size=32))
    # Stacked kernels quantised layer by layer as the unrolled ones are, one by one.
    unrolled = quantize.quantize_params(Assistant(tiny_config, params).params, mode, 32)
    for other in (in_memory.params, unrolled):
      assert set(flatten_dict(loaded.params)) == set(flatten_dict(other))
      for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)
  # The loaded Assistant runs (nf4: its codes went through uint8 on disk).
  assert ([a.token_ids for a in loaded.generate_batch(images, questions, sampling=sampling)]
          == [a.token_ids for a in in_memory.generate_batch(images, questions,
                                                            sampling=sampling)])
  assert not quantize.is_saved(source) and quantize.is_saved(out)
  with open(os.path.join(out, quantize.QUANTIZATION_FILE)) as f:
    assert f.read().replace(" ", "").replace("\n", "") == '{"mode":"nf4","group_size":32}'


@pytest.mark.slow
def test_trained_synthetic_run_keeps_its_heldout_answers_quantised(tmp_path):
  """The issue's bar on a trained model: the synthetic run (800 steps, ~3 min), computed in
  bfloat16: int8 greedy tokens equal bfloat16's at >= 99% of the held-out answers'
  positions and held-out accuracy stays 1.000; int4 at >= 95%."""
  config = load_config("configs/synthetic.py", ["--config.eval.heldout_examples=0"])
  trainer = loop.Trainer(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  trainer.run()
  config.model.dtype = "bfloat16"
  params = jax.device_get(trainer.state.params)
  questions = synthetic.questions(config, 64)
  sampling = generate.Sampling(max_new_tokens=synthetic.max_new_tokens(config))

  def answer(mode):
    assistant = Assistant(config, params, quantize=mode)
    return assistant.generate_batch([q.image for q in questions],
                                    [q.prompt for q in questions], sampling=sampling)

  def accuracy(answers):
    return np.mean([a.text.lower() == q.answer.lower() for a, q in zip(answers, questions)])

  reference = answer(None)
  assert accuracy(reference) == 1.0
  int8 = answer("int8")
  assert _agreement(int8, reference) >= 0.99 and accuracy(int8) == 1.0
  assert _agreement(answer("int4"), reference) >= 0.95


def test_the_commands_quantise_a_checkpoint_and_run_it(tiny_config, tmp_path):
  """`infllava convert quantize --bits 8` writes an int8 checkpoint that `generate` runs in
  int8 (its load line says so) with the same answer as `generate --quantize int8` on the
  float checkpoint; refused flags are one line."""
  params = random_params(tiny_config.model, std=0.05, unit_scales=False)
  source, out = tmp_path / "float", tmp_path / "int8"
  converted.save_converted(str(source), tiny_config.model, params)
  image = tmp_path / "image.png"
  images, questions = _questions(1)
  PIL.Image.fromarray(images[0]).save(image)
  done = infllava("convert", "quantize", "--checkpoint", source, "--out", out, "--bits", "8")
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith(f"wrote {out} (int8)")
  assert quantize.is_saved(str(out))
  ask = ("--image", image, "--prompt", questions[0], "--max-new-tokens", 6)
  stored = infllava("generate", "--checkpoint", out, *ask)
  in_memory = infllava("generate", "--checkpoint", source, "--quantize", "int8", *ask)
  for done in (stored, in_memory):
    assert done.returncode == 0, done.stderr
    assert ", int8) in " in done.stderr
  assert stored.stdout == in_memory.stdout
  taken = infllava("convert", "quantize", "--checkpoint", source, "--out", out, "--bits", "4")
  assert "is not empty" in error_line(taken, "convert quantize")
