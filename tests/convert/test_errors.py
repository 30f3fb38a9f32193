"""Each kind of bad checkpoint gives an error that names the tensor or file (CLI exit 1)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from infllava_jax.convert import cli, readers
from infllava_jax.convert.mapping import ConversionError
from tests.convert import tiny_checkpoints as tc
from tests.run_cli import error_line, infllava

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good_release(tiny_config, tmp_path_factory):
  root = tmp_path_factory.mktemp("good")
  tc.write_release(str(root), tiny_config.model)
  return root


@pytest.fixture
def release(good_release, tmp_path):
  """A fresh copy of the good release, to break."""
  return shutil.copytree(good_release, tmp_path / "release")


def shard_of(release, name):
  with open(release / readers.INDEX_FILES[0]) as f:
    return release / json.load(f)["weight_map"][name]


def edit_shard(release, name, edit):
  """Rewrites the shard holding `name` with `edit(tensors dict)` applied."""
  path = shard_of(release, name)
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def convert_error(release, capsys, tmp_path) -> str:
  code = cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py",
                   "--model", str(release), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 1, err
  assert not os.path.exists(tmp_path / "out" / "params")
  return err


def test_missing_tensor_is_named(release, capsys, tmp_path):
  edit_shard(release, Q0, lambda t: t.pop(Q0))
  with open(release / readers.INDEX_FILES[0]) as f:
    index = json.load(f)
  del index["weight_map"][Q0]
  with open(release / readers.INDEX_FILES[0], "w") as f:
    json.dump(index, f)
  err = convert_error(release, capsys, tmp_path)
  assert f"missing tensor {Q0!r} (param llm/layers/attn/q/kernel)" in err


def test_unexpected_tensor_is_named(release, capsys, tmp_path):
  extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
  edit_shard(release, Q0, lambda t: t.update({extra: np.zeros(8, np.float32)}))
  with open(release / readers.INDEX_FILES[0]) as f:
    index = json.load(f)
  index["weight_map"][extra] = index["weight_map"][Q0]
  with open(release / readers.INDEX_FILES[0], "w") as f:
    json.dump(index, f)
  err = convert_error(release, capsys, tmp_path)
  assert f"unexpected tensor {extra!r} [8]: no rule maps it" in err


def test_shape_mismatch_names_tensor_expected_and_found(release, capsys, tmp_path):
  edit_shard(release, Q0, lambda t: t.update({Q0: np.zeros((64, 48), np.float32)}))
  err = convert_error(release, capsys, tmp_path)
  assert (f"shape mismatch for {Q0!r} (param llm/layers/attn/q/kernel): expected [64, 64], "
          f"found [64, 48] in {shard_of(release, Q0).name}") in err


def test_vocab_disagreement_names_the_pad_row(release, capsys, tmp_path):
  embed = "model.embed_tokens.weight"
  edit_shard(release, embed, lambda t: t.update({embed: t[embed][:-1]}))
  err = convert_error(release, capsys, tmp_path)
  assert f"shape mismatch for {embed!r}" in err
  assert "expected [512, 64], found [511, 64]" in err
  assert "vocab_size is 512 (config.json)" in err


def test_wrong_model_type_is_named(release, capsys, tmp_path):
  with open(release / "config.json") as f:
    config = json.load(f)
  config["model_type"] = "llava"
  with open(release / "config.json", "w") as f:
    json.dump(config, f)
  err = convert_error(release, capsys, tmp_path)
  assert "config.json: model_type='llava'; expected 'llava_llama'" in err
  assert "--llava-hf" in err


def test_truncated_shard_is_named(release, capsys, tmp_path):
  path = shard_of(release, Q0)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  err = convert_error(release, capsys, tmp_path)
  assert f"{path}: not a readable safetensors file" in err and "truncated" in err


def test_bad_index_json_is_named(release, capsys, tmp_path):
  (release / readers.INDEX_FILES[0]).write_text('{"weight_map": {"a": ')
  err = convert_error(release, capsys, tmp_path)
  assert f"{release / readers.INDEX_FILES[0]}: bad index" in err


def test_index_naming_a_missing_shard_or_tensor_is_named(release, capsys, tmp_path):
  with open(release / readers.INDEX_FILES[0]) as f:
    index = json.load(f)
  real = index["weight_map"]["model.norm.weight"]
  index["weight_map"]["model.norm.weight"] = next(
      s for s in sorted(set(index["weight_map"].values())) if s != real)
  index["weight_map"][Q0] = "model-00009-of-00003.safetensors"
  with open(release / readers.INDEX_FILES[0], "w") as f:
    json.dump(index, f)
  err = convert_error(release, capsys, tmp_path)
  # Each moved tensor is also in a shard whose index entry no longer lists it.
  assert f"{release / readers.INDEX_FILES[0]}: bad index, 4 problem(s)" in err
  assert f"shard 'model-00009-of-00003.safetensors' (listed for 1 tensors, e.g. {Q0!r})" in err
  assert "tensor 'model.norm.weight' is listed in shard" in err
  assert f"tensor 'model.norm.weight' is in shard {real!r} but the index does not list it" in err
  assert f"tensor {Q0!r} is in shard" in err


class _Payload:
  """Pickles to a call that would create a file, if anything ever executed it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_bin_files_load_only_weights(tmp_path):
  marker = tmp_path / "executed"
  path = tmp_path / "mm_projector.bin"
  torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "evil": _Payload(str(marker))},
             str(path))
  with pytest.raises(ConversionError, match=f"{path}: cannot load with "
                                            r"torch.load\(weights_only=True\)"):
    readers.file_refs(str(path))
  assert not marker.exists()


def test_mistakes_in_paths_and_overrides_are_one_line_and_exit_2(good_release, tmp_path):
  done = infllava("convert", "from-pytorch", "--model", good_release, "--out", tmp_path / "o",
                  "--config", "configs/tiny.py", "--config.model.dtpye=float32")
  assert error_line(done, "convert") == (
      "infllava convert: error: configs/tiny.py with --config.model.dtpye=float32: unknown "
      "field 'dtpye'. Did you mean \"dtype\" instead of \"dtpye\"?")
  assert not os.path.exists(tmp_path / "o")
  os.makedirs(tmp_path / "taken" / "params")
  done = infllava("convert", "from-pytorch", "--model", tmp_path / "missing", "--out",
                  tmp_path / "taken")
  assert error_line(done, "convert") == (
      f"infllava convert: error: --model '{tmp_path / 'missing'}' does not exist")
  done = infllava("convert", "from-pytorch", "--model", good_release, "--out",
                  tmp_path / "taken", "--config", "configs/tiny.py")
  assert error_line(done, "convert from-pytorch") == (
      f"infllava convert from-pytorch: error: {tmp_path / 'taken' / 'params'} exists: choose "
      "a new --out folder (a checkpoint is never overwritten)")
  done = infllava("convert", "to-pytorch", "--checkpoint", good_release, "--out",
                  tmp_path / "o", "--config.model.dtype=float32")
  assert error_line(done, "convert").startswith(
      "infllava convert: error: unrecognised arguments: --config.model.dtype=float32")
