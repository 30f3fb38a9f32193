"""The compute dtype of a converted float32 checkpoint: `convert from-pytorch` records the
config's `model.dtype` (the 8B preset's bfloat16 unless `--config.model.dtype=...`) and
says so; `--dtype` runs a checkpoint in another, as if converted with it."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from infllava_jax import generate
from infllava_jax.config import load_config
from infllava_jax.convert import cli
from infllava_jax.inference import Assistant
from tests.convert import tiny_checkpoints as tc
from tests.run_cli import infllava

IMAGE_TOKEN = 500


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{dtype: (checkpoint folder, stdout, stderr)} of one float32 llava-hf folder converted
  twice: with the default config (bfloat16 compute), and with --config.model.dtype=float32."""
  root = tmp_path_factory.mktemp("dtype")
  tc.write_llava_hf(str(root / "hf"), load_config("configs/tiny.py:llava").model, IMAGE_TOKEN)
  runs = {}
  for dtype, overrides in (("bfloat16", []), ("float32", ["--config.model.dtype=float32"])):
    out, err, path = io.StringIO(), io.StringIO(), str(root / dtype)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      assert cli.main(["from-pytorch", "--llava-hf", str(root / "hf"), "--out", path,
                       *overrides]) == 0
    runs[dtype] = path, out.getvalue(), err.getvalue()
  return runs


def test_the_recorded_compute_dtype_is_stated_and_overridable(converted):
  for dtype, (path, out, err) in converted.items():
    assert out.splitlines()[-1] == (
        f"wrote {path}: computes in {dtype} (model.dtype), params stored as float32")
    with open(f"{path}/model_config.json") as f:
      recorded = json.load(f)
    assert (recorded["dtype"], recorded["llm"]["param_dtype"]) == (dtype, "float32")
  path, _, err = converted["bfloat16"]
  assert (f"note: {path} computes in bfloat16 (model.dtype), params stored as float32: "
          "generate, chat, serve and evaluate compute in bfloat16 unless given --dtype "
          "float32") in err
  assert "computes in" not in converted["float32"][2]


def test_dtype_runs_a_checkpoint_as_if_converted_with_it(converted, tmp_path):
  bf16, f32 = converted["bfloat16"][0], converted["float32"][0]
  default = Assistant.from_run(bf16)
  assert default.config.model.dtype == "bfloat16"
  assert default.params["llm"]["embed"]["embedding"].dtype == jax.numpy.bfloat16  # narrowed
  as_f32 = Assistant.from_run(bf16, dtype="float32")
  recorded = Assistant.from_run(f32)
  assert as_f32.config.model.to_dict() == recorded.config.model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, as_f32.params, recorded.params)

  image = tmp_path / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(image)
  greedy = generate.Sampling(max_new_tokens=8)
  want = recorded.ask(str(image), "What is it?", sampling=greedy)
  done = infllava("generate", "--checkpoint", bf16, "--dtype", "float32", "--image", image,
                  "--prompt", "What is it?", "--max-new-tokens", "8")
  assert done.returncode == 0, done.stderr
  assert f"loaded {bf16} (llava, float32) in " in done.stderr
  assert done.stdout.splitlines()[-1] == f"A: {want}"
