"""Builds the shipped tokenizer: a small byte-level BPE with the LLaMA-3 special tokens.

    python -m infllava_jax.data.build_tokenizer [--out infllava_jax/data/assets/tokenizer]

It mirrors LLaMA-3's design (same pre-tokenizer regex, byte-level alphabet, an automatic
`<|begin_of_text|>`, special tokens after the BPE vocabulary, `<pad>` last as the INF-LLaVA
training code adds it), so the templates behave the same with it as with the real one.
Training is deterministic: the corpus is embedded (the synthetic set's texts, the llama3
system prompt and a little English), and running the script twice writes identical files.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from infllava_jax.data import synthetic, templates

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")
# Total size, specials and <pad> included: the tiny preset sets llm.vocab_size = 512.
VOCAB_SIZE = 512
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>")
PAD = "<pad>"
# LLaMA-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ENGLISH = """\
The quick brown fox jumps over the lazy dog. A cat sits on the mat and looks at the window.
What is in the image? Describe the picture in detail. The photo shows a small red car
parked next to a tall green tree. There are two people walking on the street.
Answer the question using a single word or phrase. What color is the sign? How many
objects are there? Where is the dog? Is there a person in the image? Yes. No.
"""


def corpus() -> list[str]:
  # The header words and "\n\n" between specials, and the task texts, are repeated so
  # they become single tokens (as in LLaMA-3) before the rarer English merges.
  frequent = ["\n\nsystem", "\n\nuser", "\n\nassistant", "\n"] + synthetic.corpus_lines()
  return frequent * 20 + [templates.LLAMA3_SYSTEM] * 5 + ENGLISH.splitlines()


def build(texts: Sequence[str] | None = None) -> Tokenizer:
  """The BPE trained on `texts` (default: `corpus()`, the shipped tokenizer)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIALS) - 1, show_progress=False,
                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  tok.add_special_tokens([AddedToken(PAD, special=True, normalized=False)])
  bos = SPECIALS[0]
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))]),
  ])
  return tok


def save(tok: Tokenizer, out: str) -> None:
  from transformers import PreTrainedTokenizerFast
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                 eos_token="<|eot_id|>", pad_token=PAD, padding_side="right",
                                 model_max_length=2048)
  os.makedirs(out, exist_ok=True)
  fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
  args = parser.parse_args(argv)
  tok = build()
  save(tok, args.out)
  print(f"wrote {args.out}: {tok.get_vocab_size(with_added_tokens=True)} tokens")
  return 0


if __name__ == "__main__":
  sys.exit(main())
