"""llava-hf LlavaForConditionalGeneration -> the LLaVA-1.5 baseline: logits match HF (1e-4)."""

import numpy as np
import pytest
import torch

from infllava_jax.config import load_config
from infllava_jax.checkpoints import converted as converted_format
from infllava_jax.convert import cli, sources
from infllava_jax.convert.llama_table import llama_config_from_hf
from infllava_jax.model import infllava
from tests.convert import tiny_checkpoints as tc

LOGITS_TOL = 1e-4
IMAGE_TOKEN = 500  # a real vocabulary id, as llava-hf's <image> is


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava_hf")
  model_cfg = load_config("configs/tiny.py:llava").model
  hf_model = tc.write_llava_hf(str(root / "hf"), model_cfg, IMAGE_TOKEN)
  assert cli.main(["from-pytorch", "--quiet", "--config", "configs/tiny.py:llava",
                   "--llava-hf", str(root / "hf"), "--out", str(root / "converted")]) == 0
  return hf_model, *converted_format.load_converted(str(root / "converted"))


def test_config_is_the_baseline_with_the_hf_image_token(converted):
  _, model_cfg, params = converted
  assert model_cfg.variant == "llava" and "dem" not in params
  assert model_cfg.image_token_id == IMAGE_TOKEN
  assert model_cfg.vision.feature_layer == -2 and model_cfg.vision.feature_select == "patch"


def test_image_and_text_logits_match_hf(converted):
  hf_model, model_cfg, params = converted
  rng = np.random.default_rng(0)
  n_img = infllava.num_image_tokens(model_cfg)
  tokens = rng.integers(0, IMAGE_TOKEN, (2, n_img + 9))
  tokens[:, 3:3 + n_img] = IMAGE_TOKEN
  side = model_cfg.dcm.image_size
  pixels = rng.standard_normal((2, side, side, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf_model(input_ids=torch.from_numpy(tokens),
                    pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()
  got, _ = infllava.build_model(model_cfg).apply({"params": params}, tokens.astype(np.int32),
                                                 pixels[:, None])
  np.testing.assert_allclose(np.asarray(got), want, atol=LOGITS_TOL, rtol=0)



def test_the_hubs_minimal_text_config_is_completed_with_llama_defaults():
  # llava-hf/llava-1.5-7b-hf's config.json holds only these text_config fields.
  hub = {"text_config": {"max_position_embeddings": 4096, "model_type": "llama",
                         "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064}}
  llm = llama_config_from_hf(sources.llava_text_config(hub), allow_tied=True)
  assert (llm.width, llm.depth, llm.heads, llm.kv_heads, llm.head_dim, llm.mlp_dim) == (
      4096, 32, 32, 32, 128, 11008)  # Vicuna-7B's, LlamaConfig's defaults
  assert (llm.vocab_size, llm.max_positions, llm.rms_norm_eps, llm.rope_theta) == (
      32064, 4096, 1e-05, 10000.0)
  # A full text_config (what transformers 5 writes) comes through unchanged.
  full = tc.llama_config(load_config("configs/tiny.py:llava").model.llm).to_dict()
  assert llama_config_from_hf(sources.llava_text_config({"text_config": full}),
                              allow_tied=True) == llama_config_from_hf(full, allow_tied=True)
