"""The wheel, installed outside the checkout, runs the commands: nothing read from the repository.

One test in steps: install the wheel into a fresh virtualenv that sees this environment's
dependencies but not its infllava_jax (`tests/wheel_env.py`); then, from a folder with no
configs/, convert a tiny random HF LLaMA + CLIP, generate from it, evaluate it on the
synthetic benchmark, and train the `synthetic` preset (the wheel's shipped tokenizer) for
two steps.
"""

import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from infllava_jax.config import load_config
from infllava_jax.data import tokenizer
from tests.convert import tiny_checkpoints as tc
from tests.wheel_env import make_venv, run, session_wheel


def hf_folders(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A random LLaMA of the tiny preset's sizes less the <pad> row (the converter adds it),
  with the shipped tokenizer, and a random CLIP."""
  model_cfg = load_config("tiny").model
  llm_cfg = model_cfg.llm.copy_and_resolve_references()
  llm_cfg.vocab_size -= 1
  torch.manual_seed(0)
  llama, clip = work / "llama", work / "clip"
  transformers.LlamaForCausalLM(tc.llama_config(llm_cfg)).save_pretrained(str(llama))
  shutil.copytree(tokenizer.DEFAULT_PATH, llama, dirs_exist_ok=True)
  transformers.CLIPVisionModel(tc.clip_config(model_cfg.vision)).save_pretrained(str(clip))
  return llama, clip


@pytest.mark.slow
def test_the_installed_wheel_runs_outside_the_checkout(tmp_path, tmp_path_factory):
  wheel = session_wheel(tmp_path_factory)
  venv = make_venv(tmp_path, wheel)
  llama, clip = hf_folders(tmp_path)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), np.uint8)).save(
      tmp_path / "image.png")
  outside = tmp_path / "elsewhere"  # cwd: no configs/ folder, no infllava_jax/
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  infllava = venv / "bin" / "infllava"

  where = run([venv / "bin" / "python", "-c", "import infllava_jax; print(infllava_jax.__file__)"],
              outside, env)
  assert pathlib.Path(where.strip()).is_relative_to(venv), where
  run([infllava, "convert", "from-pytorch", "--quiet", "--config", "tiny", "--llama", llama,
       "--clip", clip, "--out", "ckpt"], outside, env)
  answer = run([infllava, "generate", "--checkpoint", "ckpt", "--image", tmp_path / "image.png",
                "--prompt", "What is in the image?", "--max-new-tokens", "4"], outside, env)
  assert answer.strip(), "no answer"
  run([infllava, "evaluate", "--checkpoint", "ckpt", "--benchmark", "synthetic", "--limit", "2",
       "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--out", "eval"],
      outside, env)
  assert (outside / "eval").is_dir() and any((outside / "eval").iterdir())
  run([infllava, "train", "--config", "synthetic", "--workdir", "run",
       "--config.train.steps=2", "--config.data.batch_size=2",
       "--config.data.synthetic.num_train=8", "--config.eval.heldout_examples=0"],
      outside, env)
  assert sorted(p.name for p in (outside / "run" / "checkpoints").iterdir()) == ["2"]
