"""RoPE: inverse frequencies equal transformers' (plain and LLaMA-3.1-scaled)."""

import numpy as np
import transformers
from ml_collections import ConfigDict
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from infllava_jax.convert.llama_table import llama_config_from_hf
from infllava_jax.model import rope
from tests.model.test_llama import hf_config_dict


def test_rope_frequencies_match_hf():
  hf_config = hf_config_dict(new_spelling=True)
  llm_cfg = llama_config_from_hf(hf_config)
  ours = rope.rope_inverse_frequencies(llm_cfg)
  theirs = LlamaRotaryEmbedding(transformers.LlamaConfig(**hf_config)).inv_freq.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
  # The scaling must bite at this size, or the test above proves nothing about it.
  plain_cfg = ConfigDict(llm_cfg.to_dict())
  plain_cfg.rope_scaling = None
  plain = rope.rope_inverse_frequencies(plain_cfg)
  assert np.sum(~np.isclose(plain, ours)) >= 4
