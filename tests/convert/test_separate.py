"""HF LLaMA-3 + HF CLIP folders (+ a stage-1 mm_projector.bin): the <pad> row, PyTorch-default init (docs/fidelity.md#module-init)
and the tokenizer copied beside the params."""

import math
import shutil

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from infllava_jax.checkpoints import converted, locate
from infllava_jax.convert import cli, sources
from infllava_jax.data import tokenizer
from tests.convert import tiny_checkpoints as tc


@pytest.fixture(scope="module")
def folders(tiny_config, tmp_path_factory):
  """HF folders of a LLaMA with one row fewer than the model (no <pad>), with a tokenizer
  (the package's, whose <pad> the loader adds), and a CLIP."""
  root = tmp_path_factory.mktemp("separate")
  model_cfg = tiny_config.model
  llm_cfg = model_cfg.llm.copy_and_resolve_references()
  llm_cfg.vocab_size -= 1
  torch.manual_seed(0)
  llama = tc.transformers.LlamaForCausalLM(tc.llama_config(llm_cfg))
  clip = tc.transformers.CLIPVisionModel(tc.clip_config(model_cfg.vision))
  tc.perturb_norms(clip)
  llama.save_pretrained(str(root / "llama"))
  shutil.copytree(tokenizer.DEFAULT_PATH, str(root / "llama"), dirs_exist_ok=True)
  clip.save_pretrained(str(root / "clip"))
  projector = tc.dem_projector_tensors(model_cfg)
  torch.save(projector, str(root / "mm_projector.bin"))
  return root, llama, clip, projector


def convert(root, out, *extra):
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py",
                   "--llama", str(root / "llama"), "--clip", str(root / "clip"),
                   "--out", str(root / out), *extra]) == 0
  return converted.load_converted(str(root / out))


def test_pad_row_is_the_mean_row_and_modules_are_initialised(folders):
  root, llama, clip, _ = folders
  model_cfg, params = convert(root, "stage1")
  embed = llama.model.embed_tokens.weight.detach().numpy()
  head = llama.lm_head.weight.detach().numpy()
  assert model_cfg.llm.vocab_size == embed.shape[0] + 1
  got_embed = params["llm"]["embed"]["embedding"]
  got_head = params["llm"]["lm_head"]["kernel"]
  np.testing.assert_array_equal(got_embed[:-1], embed)
  np.testing.assert_allclose(got_embed[-1], embed.mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(got_head[:, :-1], head.T)
  np.testing.assert_allclose(got_head[:, -1], head.mean(0), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(params["vision"]["class_embed"],
                                clip.state_dict()["embeddings.class_embedding"].numpy())
  # docs/fidelity.md#module-init: PyTorch default init, U(+-1/sqrt(fan_in)) for Linear, LayerNorm (1, 0).
  fc1 = params["projector"]["fc1"]
  bound = 1 / math.sqrt(model_cfg.vision.width)
  assert 0.9 * bound < np.abs(fc1["kernel"]).max() <= bound
  assert 0 < np.abs(fc1["bias"]).max() <= bound
  np.testing.assert_array_equal(params["dem"]["fuse_norm"]["scale"], 1)
  np.testing.assert_array_equal(params["dem"]["fuse_norm"]["bias"], 0)


def test_stage1_projector_file_is_loaded(folders):
  root, _, _, projector = folders
  model_cfg, params = convert(root, "stage2", "--projector", str(root / "mm_projector.bin"))
  flat = flatten_dict(params, sep="/")
  rules = [r for r in sources.release_table(model_cfg) if r.torch in projector]
  assert len(rules) == len(projector) == 24
  for rule in rules:
    np.testing.assert_array_equal(flat[rule.path],
                                  rule.transform.to_flax(projector[rule.torch].numpy()))


def test_the_sources_tokenizer_goes_with_the_checkpoint(folders, capsys):
  root = folders[0]
  convert(root, "with_tokenizer")
  out = root / "with_tokenizer"
  assert "tokenizer copied from" not in capsys.readouterr().out  # --quiet
  copied = converted.tokenizer_dir(str(out))
  assert copied == str(out / "tokenizer")
  assert locate.checkpoint_config(str(out)).data.tokenizer_path == copied
  loaded = tokenizer.load_tokenizer(copied)
  shipped = tokenizer.load_tokenizer()
  assert len(loaded) == len(shipped)
  text = "What letter is in the top-left cell?"
  assert loaded.encode(text) == shipped.encode(text)
  # The release layout carries it on, and converting that copies it again.
  assert cli.main(["to-pytorch", "--quiet", "--checkpoint", str(out),
                   "--out", str(root / "exported")]) == 0
  assert (root / "exported" / "tokenizer.json").is_file()
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py", "--model",
                   str(root / "exported"), "--out", str(root / "reconverted")]) == 0
  again = tokenizer.load_tokenizer(converted.tokenizer_dir(str(root / "reconverted")))
  assert again.encode(text) == shipped.encode(text) and len(again) == len(shipped)


def test_llava_next_starts_with_its_image_newline_initialised(folders):
  root, llama, _, _ = folders
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py:llava_next",
                   "--llama", str(root / "llama"), "--clip", str(root / "clip"),
                   "--out", str(root / "next")]) == 0
  model_cfg, params = converted.load_converted(str(root / "next"))
  assert model_cfg.variant == "llava_next" and "dem" not in params
  newline = np.asarray(params["image_newline"])
  # normal(0, 1/sqrt(width)), as LlavaNextModel initialises it
  assert newline.shape == (64,) and 0.5 / 8 < newline.std() < 2 / 8
  np.testing.assert_array_equal(params["llm"]["embed"]["embedding"][:-1],
                                llama.model.embed_tokens.weight.detach().numpy())
