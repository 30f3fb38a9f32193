"""Held-out accuracy on the synthetic fine-detail set: greedy answers, exact match.

As a benchmark (`infllava evaluate --benchmark synthetic`), the held-out split's records
become `Question`s (category: the question kind, letter or count) and go through the same
runner and scorer as the public benchmarks.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from infllava_jax import generate
from infllava_jax.config import load_config
from infllava_jax.data import synthetic
from infllava_jax.evaluate import runner, scoring
from infllava_jax.evaluate.records import Question
from infllava_jax.inference import Assistant

SOURCE = "synthetic held-out split"
DEFAULT_CONFIG = "synthetic"  # the preset


def synthetic_config(config: ConfigDict) -> ConfigDict:
  """`config.data.synthetic`, or the default run's (a converted checkpoint stores no data
  config)."""
  data = config.get("data") or ConfigDict()
  return data.get("synthetic") or load_config(DEFAULT_CONFIG).data.synthetic


def max_new_tokens(config: ConfigDict) -> int:
  return (config.get("eval") or ConfigDict()).get("max_new_tokens", 8)


def questions(config: ConfigDict, num: int) -> list[Question]:
  """The first `num` held-out records as exact-answer Questions."""
  syn = synthetic_config(config)
  kinds = syn.get("kinds", synthetic.DEFAULT_KINDS)
  return [Question(id=r["id"], image=r["image"], prompt=_first_question(r),
                   answer=r["conversations"][1]["value"], category=r["kind"], kind="exact",
                   source=SOURCE)
          for r in synthetic.synthetic_examples("heldout", num, syn.seed, syn.image_size,
                                                 kinds=kinds)]


def heldout_accuracy(params: Any, config: ConfigDict, num: int | None = None,
                     batch_size: int = 16, progress: bool = True) -> dict:
  """{"accuracy", "examples", "by_kind": {kind: accuracy}} over the first `num` held-out records.

  Every record's first question is asked with its image; the answer is right when the
  greedy output equals the reference answer (case and surrounding spaces ignored).
  """
  num = num or config.eval.heldout_examples
  assistant = Assistant(config, params)
  sampling = generate.Sampling(max_new_tokens=max_new_tokens(config))
  rows = runner.run(assistant, questions(config, num), sampling, batch_size, progress=progress)
  summary = scoring.summarize("synthetic", rows)
  return {"accuracy": summary["accuracy"], "examples": num, "by_kind": summary["by_category"]}


def _first_question(record: dict) -> str:
  return record["conversations"][0]["value"].replace("<image>", "").strip()
