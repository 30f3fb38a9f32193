"""Time per question through lmms-eval: the in-process `infllava` model vs its `openai`
model against `infllava serve`, side by side in one run, on the tiny model.

    python bench/lmms_routes.py [--questions 32] [--batch-size 8] [--checkpoint DIR]

Needs the [lmms] extra and lmms-eval (README). Without --checkpoint, a tiny random
checkpoint (configs/tiny.py) is written to a temporary folder. The task: the first N
synthetic held-out records as an lmms-eval task (`lmms.write_task`, exact match, 8 new
tokens), read from a local parquet; no network (HF_HUB_OFFLINE).

In-process: `lmms.evaluate` (batches of --batch-size, the last padded). Server: lmms-eval's
`openai` model (num_concurrent=1, images as base64 PNG data URLs) against
`serve.create_app` under uvicorn on 127.0.0.1, in this process, the same Assistant: one
request generates at a time, batch 1. Each route runs once over the first batch to compile,
then is timed over all N: the wall time of lmms-eval's `simple_evaluate` (task loading,
prompts, generation, scoring) / N. Both routes must give the same answers (exit 1 if not).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
  os.environ[_name] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK = "bench_synthetic_heldout"
MAX_NEW_TOKENS = 8


def served_answers(assistant, folder: str, limit: int) -> tuple[dict, float]:
  """lmms-eval's `openai` model against `infllava serve`: (results, seconds)."""
  import contextlib
  import threading

  import uvicorn
  from lmms_eval.evaluator import simple_evaluate
  from lmms_eval.tasks import TaskManager

  from infllava_jax import serve

  @contextlib.contextmanager
  def serving(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
      if not thread.is_alive():
        raise RuntimeError("uvicorn did not start")
      time.sleep(0.05)
    try:
      yield server.servers[0].sockets[0].getsockname()[1]
    finally:
      server.should_exit = True
      thread.join(timeout=10)

  with serving(serve.create_app(assistant, "bench")) as port:
    start = time.perf_counter()
    results = simple_evaluate(
        model="openai", model_args=f"model=bench,base_url=http://127.0.0.1:{port}/v1,"
                                   "api_key=none,num_concurrent=1,timeout=600,max_retries=1",
        tasks=[TASK], limit=limit, log_samples=True, verbosity="WARNING",
        task_manager=TaskManager("WARNING", include_path=folder, include_defaults=False))
    return results, time.perf_counter() - start


def in_process_answers(assistant, folder: str, limit: int, batch_size: int
                       ) -> tuple[dict, float]:
  from infllava_jax.evaluate import lmms
  start = time.perf_counter()
  results = lmms.evaluate(assistant, [TASK], batch_size, limit, folder, progress=False)
  return results, time.perf_counter() - start


def outputs(results: dict) -> list[str]:
  return [s["filtered_resps"][0] for s in sorted(results["samples"][TASK],
                                                 key=lambda s: s["doc_id"])]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--questions", type=int, default=32)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--checkpoint", default=None, help="default: a tiny random one")
  args = parser.parse_args()

  import jax
  from infllava_jax.evaluate import lmms, synthetic
  from infllava_jax.inference import Assistant

  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = args.checkpoint
    if checkpoint is None:
      from infllava_jax.checkpoints import converted
      from infllava_jax.config import load_config
      from tests.random_params import random_params
      config = load_config("tiny")
      checkpoint = os.path.join(tmp, "tiny")
      converted.save_converted(checkpoint, config.model,
                               random_params(config.model, std=0.05))
    assistant = Assistant.from_run(checkpoint)
    folder = os.path.join(tmp, "tasks")
    lmms.write_task(folder, TASK, synthetic.questions(assistant.config, args.questions),
                    MAX_NEW_TOKENS)
    # Compile both routes' programs (batch --batch-size, and the server's batch 1).
    in_process_answers(assistant, folder, args.batch_size, args.batch_size)
    served_answers(assistant, folder, 1)
    local, local_s = in_process_answers(assistant, folder, args.questions, args.batch_size)
    served, served_s = served_answers(assistant, folder, args.questions)
  same = outputs(local) == outputs(served)
  report = {
      "device": jax.devices()[0].device_kind, "questions": args.questions,
      "batch_size": args.batch_size, "max_new_tokens": MAX_NEW_TOKENS,
      "in_process_s_per_question": round(local_s / args.questions, 4),
      "server_s_per_question": round(served_s / args.questions, 4),
      "server_over_in_process": round(served_s / local_s, 2),
      "same_answers": same,
      "exact_match": [local["results"][TASK]["exact_match,none"],
                      served["results"][TASK]["exact_match,none"]]}
  print(json.dumps(report, indent=2, default=float))
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
