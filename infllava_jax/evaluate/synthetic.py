"""Held-out accuracy on the synthetic fine-detail set: greedy answers, exact match."""

from __future__ import annotations

import time
from typing import Any

from ml_collections import ConfigDict

from infllava_jax import generate
from infllava_jax.data import synthetic
from infllava_jax.inference import Assistant


def heldout_accuracy(params: Any, config: ConfigDict, num: int | None = None,
                     batch_size: int = 16, progress: bool = True) -> dict:
  """{"accuracy", "examples", "by_kind": {kind: accuracy}} over the first `num` held-out records.

  Every record's first question is asked with its image; the answer is right when the
  greedy output equals the reference answer (case and surrounding spaces ignored).
  """
  num = num or config.eval.heldout_examples
  syn = config.data.synthetic
  assistant = Assistant(config, params)
  sampling = generate.Sampling(max_new_tokens=config.eval.get("max_new_tokens", 8))
  records = list(synthetic.synthetic_examples("heldout", num, syn.seed, syn.image_size))
  right, by_kind, start = 0, {}, time.perf_counter()
  for lo in range(0, num, batch_size):
    chunk = records[lo:lo + batch_size]
    # Pad the last chunk to the batch size so one compiled program serves every chunk.
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    answers = assistant.ask_batch([r["image"] for r in padded],
                                  [_first_question(r) for r in padded], sampling)
    for record, answer in zip(chunk, answers):
      ok = answer.strip().lower() == record["conversations"][1]["value"].strip().lower()
      right += ok
      hits, total = by_kind.get(record["kind"], (0, 0))
      by_kind[record["kind"]] = (hits + ok, total + 1)
    if progress:
      done = min(lo + batch_size, num)
      print(f"  evaluated {done}/{num} held-out examples, accuracy so far "
            f"{right / done:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
  return {"accuracy": right / num, "examples": num,
          "by_kind": {k: h / t for k, (h, t) in sorted(by_kind.items())}}


def _first_question(record: dict) -> str:
  return record["conversations"][0]["value"].replace("<image>", "").strip()
