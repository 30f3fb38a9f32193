"""The shipped tokenizer: deterministic build, LLaMA-3 specials, AutoTokenizer loading."""

import filecmp
import os

from infllava_jax.data import build_tokenizer
from infllava_jax.data.tokenizer import DEFAULT_PATH, load_tokenizer


def test_build_is_deterministic_and_matches_shipped_files(tmp_path):
  build_tokenizer.main(["--out", str(tmp_path)])
  shipped = sorted(os.listdir(DEFAULT_PATH))
  assert sorted(os.listdir(tmp_path)) == shipped
  for name in shipped:
    assert filecmp.cmp(tmp_path / name, os.path.join(DEFAULT_PATH, name), shallow=False), name


def test_specials_and_size():
  tok = load_tokenizer()
  assert len(tok) == build_tokenizer.VOCAB_SIZE == 512
  specials = [tok.convert_tokens_to_ids(s) for s in build_tokenizer.SPECIALS]
  # After the BPE vocabulary, in LLaMA-3's order, <pad> last (docs/fidelity.md#pad-row).
  assert specials == list(range(506, 511))
  assert tok.pad_token == "<pad>" and tok.pad_token_id == 511
  assert tok.bos_token_id == specials[0] and tok.padding_side == "right"
  # Automatic BOS, specials are atomic, bytes round-trip.
  enc = tok("<|start_header_id|>user<|end_header_id|>\n\nhé?")["input_ids"]
  assert enc[:2] == [specials[0], specials[2]]
  assert tok.decode(enc, skip_special_tokens=True) == "user\n\nhé?"


def test_pad_is_added_when_missing(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.train_from_iterator(["hello world"], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|begin_of_text|>"], show_progress=False))
  # A folder like Meta-Llama-3-8B-Instruct's: no pad token.
  PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>").save_pretrained(
      tmp_path)
  n = raw.get_vocab_size()
  tok = load_tokenizer(str(tmp_path))
  assert tok.pad_token == "<pad>" and tok.pad_token_id == n and len(tok) == n + 1
