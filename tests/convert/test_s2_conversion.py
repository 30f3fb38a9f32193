"""A LLaVA-S2 release (config.json `s2: true`, a projector len(scales) x CLIP wide) converts
through the release tables as the s2 variant, and `to-pytorch` writes it back bit for bit."""

import json

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from infllava_jax.checkpoints import converted as converted_format
from infllava_jax.config import load_config
from infllava_jax import cli as main_cli
from infllava_jax.convert import cli
from tests.convert import tiny_checkpoints as tc


@pytest.fixture(scope="module")
def s2_release(tmp_path_factory):
  """(model_cfg, tensors written, root): a float32 tiny S2 release in root/release."""
  root = tmp_path_factory.mktemp("s2_release")
  model_cfg = load_config("configs/tiny.py:s2").model
  _, _, tensors = tc.write_release(str(root / "release"), model_cfg)
  return model_cfg, tensors, root


def convert(config, *args):
  return cli.main(["from-pytorch", "--quiet", "--config", config, *args])


def test_s2_release_converts_and_round_trips(s2_release):
  model_cfg, tensors, root = s2_release
  assert convert("configs/tiny.py:s2", "--model", str(root / "release"),
                 "--out", str(root / "first")) == 0
  got_cfg, params = converted_format.load_converted(str(root / "first"))
  assert got_cfg.variant == "s2" and tuple(got_cfg.s2.scales) == (84, 168, 252)
  fc1 = tensors["model.mm_projector.0.weight"].numpy()
  assert fc1.shape == (model_cfg.llm.width, 3 * model_cfg.vision.width)
  np.testing.assert_array_equal(params["projector"]["fc1"]["kernel"], fc1.T)
  assert "dem" not in params

  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(root / "first"),
                   "--out", str(root / "exported")]) == 0
  with open(root / "exported" / "config.json") as f:
    exported = json.load(f)
  assert (exported["s2"], exported["s2_scales"], exported["mm_hidden_size"]) == (
      True, "84,168,252", 3 * model_cfg.vision.width)
  assert convert("configs/tiny.py:s2", "--model", str(root / "exported"),
                 "--out", str(root / "second")) == 0
  second_cfg, second = converted_format.load_converted(str(root / "second"))
  assert second_cfg.to_dict() == got_cfg.to_dict()
  first, second = flatten_dict(params, sep="/"), flatten_dict(second, sep="/")
  assert sorted(first) == sorted(second)
  for path in first:
    np.testing.assert_array_equal(first[path], second[path])


def test_variant_and_checkpoint_must_agree(s2_release, tmp_path, capsys):
  _, _, root = s2_release
  assert convert("configs/tiny.py", "--model", str(root / "release"),
                 "--out", str(tmp_path / "out")) == 1
  assert "s2=True but model.variant='infllava'" in capsys.readouterr().err
  with open(root / "release" / "config.json") as f:
    config = json.load(f)
  config["mm_hidden_size"] = 64
  (tmp_path / "bad").mkdir()
  for name in (root / "release").iterdir():
    (tmp_path / "bad" / name.name).write_bytes(name.read_bytes())
  with open(tmp_path / "bad" / "config.json", "w") as f:
    json.dump(config, f)
  assert convert("configs/tiny.py:s2", "--model", str(tmp_path / "bad"),
                 "--out", str(tmp_path / "out")) == 1
  assert "mm_hidden_size=64 but the CLIP tensors are 64 wide x 3 scales" in (
      capsys.readouterr().err)


def test_generate_answers_from_a_converted_s2_checkpoint(s2_release, tmp_path, capsys):
  from PIL import Image
  _, _, root = s2_release
  out = tmp_path / "converted"
  assert convert("configs/tiny.py:s2", "--model", str(root / "release"), "--out", str(out)) == 0
  image = tmp_path / "wide.png"  # not square: padded to 252 x 252, then the three scales
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8)).save(image)
  capsys.readouterr()
  assert main_cli.main(["generate", "--checkpoint", str(out), "--image", str(image),
                   "--prompt", "What is it?", "--max-new-tokens", "3"]) == 0
  printed = capsys.readouterr()
  assert "(s2," in printed.err + printed.out


def test_separate_folders_take_an_s2_stage1_projector(s2_release, tmp_path):
  model_cfg, _, _ = s2_release
  llama, clip = tc.tiny_models(model_cfg)
  llama.save_pretrained(str(tmp_path / "llama"))
  clip.save_pretrained(str(tmp_path / "clip"))
  projector = tc.dem_projector_tensors(model_cfg)  # LLaVA-S2's mm_projector.bin: 0.weight [64, 192]
  assert projector["model.mm_projector.0.weight"].shape == (64, 3 * 64)
  torch.save(projector, str(tmp_path / "mm_projector.bin"))
  assert convert("configs/tiny.py:s2", "--llama", str(tmp_path / "llama"), "--clip",
                 str(tmp_path / "clip"), "--projector", str(tmp_path / "mm_projector.bin"),
                 "--out", str(tmp_path / "out")) == 0
  got_cfg, params = converted_format.load_converted(str(tmp_path / "out"))
  assert got_cfg.variant == "s2" and tuple(got_cfg.s2.scales) == (84, 168, 252)
  np.testing.assert_array_equal(params["projector"]["fc1"]["kernel"],
                                projector["model.mm_projector.0.weight"].numpy().T)
