"""Loading the tokenizer: any local Hugging Face tokenizer folder, `<pad>` added as the reference does (docs/fidelity.md#pad-row).

The default is the small byte-level BPE shipped in `assets/tokenizer` (built by
`build_tokenizer.py`); the real Meta-Llama-3-8B-Instruct folder works as-is.
"""

from __future__ import annotations

import functools
import os
import threading

# Imported here, not in the loader: grain worker threads importing transformers lazily at
# the same time can see a half-initialised module.
from transformers import AutoTokenizer

PAD = "<pad>"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")
_LOCK = threading.Lock()


def load_tokenizer(path: str | None = None):
  """AutoTokenizer from a local folder (None: the shipped one), right padding, `<pad>` added.

  Like the INF-LLaVA training code, a tokenizer without a pad token gets a new special
  `<pad>` at the end of its vocabulary (LLaMA-3: id 128256, vocabulary 128257). Cached per
  process and safe to call from grain's reader threads.
  """
  with _LOCK:
    return _load(path)


@functools.lru_cache(maxsize=4)
def _load(path: str | None):
  path = path or DEFAULT_PATH
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} not found (data.tokenizer_path)")
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if tok.pad_token is None:
    tok.add_special_tokens({"pad_token": PAD})
  tok.padding_side = "right"
  return tok
