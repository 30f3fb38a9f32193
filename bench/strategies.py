"""High-resolution strategies side by side: the synthetic task for every variant, one command.

    python bench/strategies.py [--out runs/strategies] [--steps 800] [--heldout 256]
                               [--variants llava,infllava,s2,llava_next] [--tasks square,wide]
                               [--no-compile-8b] [--reduced]

Each variant's tiny synthetic config (`synthetic:<variant>`, the same towers, recipe, steps
and seeds; only the high-resolution front-end differs) trains from random weights on each
task, in this one process, one after the other:

- square: the "pattern" records as README's main job draws them (252 x 252 px);
- wide: the same records cropped to their middle 126 rows (252 x 126, 2:1), written once
  as a LLaVA JSON + PNGs under OUT/data/wide and read with data.source=llava_json: a fixed
  square input pads them, LLaVA-NeXT's AnyRes picks a grid for their shape.

Per (task, variant): held-out accuracy (greedy exact match over the first --heldout held-out
records, cropped as the task's), visual tokens per image (image slots the data pipeline
writes per image of a training batch), CLIP passes per image (`infllava.num_views` of the
variant's 8B config) and the train step time (the median of the progress
intervals' time per step after the first interval, which holds the compile). Per variant:
the 8B stage-2 train step's per-device memory from `infllava compile --config
infllava_8b_stage2:<variant> --mesh fsdp=8` (8 simulated CPU devices, XLA's memory analysis,
one row of 2048 tokens per device; a subprocess each, minutes each on 2 cores).

Variants the installed package lacks (`infllava_jax.model.infllava.VARIANTS`) are skipped and
named. Written to OUT: strategies.md (the table), strategies.json, strategies.png (held-out
accuracy against visual tokens per image). --reduced: a few steps and records, no 8B
compile (tests/bench/test_strategies.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from infllava_jax import generate  # noqa: E402
from infllava_jax.config import load_config  # noqa: E402
from infllava_jax.data import synthetic  # noqa: E402
from infllava_jax.errors import ConfigError  # noqa: E402
from infllava_jax.evaluate import runner, scoring  # noqa: E402
from infllava_jax.evaluate import synthetic as synthetic_eval  # noqa: E402
from infllava_jax.inference import Assistant  # noqa: E402
from infllava_jax.model import infllava  # noqa: E402
from infllava_jax.training import loop  # noqa: E402

VARIANTS = ("llava", "infllava", "s2", "llava_next")
LABELS = {"llava": "LLaVA-1.5 (one view)", "infllava": "INF-LLaVA (DCM + DEM)",
          "s2": "S2 (3 scales)", "llava_next": "LLaVA-NeXT (AnyRes)"}
# The synthetic preset's argument where it is not the variant's name.
PRESET_ARGS = {"llava_next": ("llava_next", "anyres")}
TASKS = ("square", "wide")
WIDE_ROWS = (63, 189)  # the middle 126 of 252 rows: a 252 x 126 image
COMPILE_TOTAL = re.compile(r"^\s+total\s+([\d.]+) GiB", re.MULTILINE)


def crop(task: str, image: np.ndarray) -> np.ndarray:
  """A record's image as the task shows it: [252, 252, 3] (square) or [126, 252, 3] (wide)."""
  return image if task == "square" else image[WIDE_ROWS[0]:WIDE_ROWS[1]]


def variant_config(variant: str, task: str, steps: int, data_dir: str):
  """`synthetic:<variant>` for the task, training `steps` steps; None if the package lacks it."""
  if variant not in infllava.VARIANTS:
    return None
  for arg in PRESET_ARGS.get(variant, (variant,)):
    try:
      config = load_config(f"synthetic:{arg}")
    except ConfigError:
      continue
    if config.model.variant == variant:
      break
  else:
    return None
  config.train.steps = steps
  config.train.log_every = max(1, min(config.train.log_every, steps // 4))
  config.checkpoint.every_steps = steps  # the last step only
  if task == "wide":
    config.data.source = "llava_json"
    config.data.json_path = os.path.join(data_dir, "train.json")
    config.data.image_folder = os.path.join(data_dir, "images")
  return config


def write_wide_data(out: str, num: int, seed: int) -> None:
  """The train split's first `num` pattern records, cropped wide, as LLaVA JSON + PNGs."""
  from PIL import Image
  if os.path.exists(os.path.join(out, "train.json")):
    with open(os.path.join(out, "train.json")) as f:
      if len(json.load(f)) == num:
        return
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  records = []
  for record in synthetic.synthetic_examples("train", num, seed, kinds=("pattern",)):
    name = record["id"] + ".png"
    Image.fromarray(crop("wide", record["image"])).save(os.path.join(out, "images", name))
    records.append({"id": record["id"], "image": name,
                    "conversations": record["conversations"]})
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(records, f)


def visual_tokens_per_image(trainer) -> float:
  """Image slots per image in one training batch of the trainer's data pipeline."""
  batch = next(trainer.data)
  slots = np.sum(np.asarray(batch["tokens"]) == trainer.config.model.image_token_id)
  pixels = batch["pixels"]  # llava_next: {"tiles", "layout" [B, M, 4]}
  rows, per_row = np.shape(pixels["layout"] if isinstance(pixels, dict) else pixels)[:2]
  return float(slots) / (rows * per_row)


def heldout_accuracy(params, config, task: str, num: int) -> float:
  questions = [dataclasses.replace(q, image=crop(task, q.image))
               for q in synthetic_eval.questions(config, num)]
  sampling = generate.Sampling(max_new_tokens=synthetic_eval.max_new_tokens(config))
  rows = runner.run(Assistant(config, params), questions, sampling, 16, progress=False)
  return scoring.summarize("synthetic", rows)["accuracy"]


def train_and_measure(config, workdir: str, task: str, heldout: int) -> dict:
  """Trains one config from scratch; its accuracy, visual tokens and step time."""
  # The callbacks of one progress interval run together once its metrics are fetched: the
  # time at its last step (a multiple of log_every) ends the interval.
  every = config.train.log_every
  ends: list[tuple[int, float]] = []
  on_metrics = lambda step, _: step % every or ends.append((step, time.perf_counter()))
  trainer = loop.Trainer(config, workdir)
  start = time.perf_counter()
  state = trainer.run(on_metrics=on_metrics)
  train_s = time.perf_counter() - start
  per_step = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(ends, ends[1:])]
  tokens = visual_tokens_per_image(trainer)
  accuracy = heldout_accuracy(state.params, config, task, heldout)
  return {"accuracy": accuracy, "visual_tokens": tokens,
          "step_s": statistics.median(per_step) if per_step else None, "train_s": train_s}


def views_per_image(variant: str) -> int | None:
  """CLIP passes per image of the variant's 8B config (None where the package cannot say)."""
  try:
    return infllava.num_views(load_config(f"infllava_8b:{variant}").model)
  except (ConfigError, ValueError):
    return None


def compile_8b(variant: str) -> float | None:
  """Per-device GiB of the 8B stage-2 step, fsdp=8 on simulated CPU devices; None if it fails."""
  done = subprocess.run(
      [sys.executable, "-m", "infllava_jax.cli", "compile", "--config",
       f"infllava_8b_stage2:{variant}", "--mesh", "fsdp=8"],
      capture_output=True, text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  found = COMPILE_TOTAL.search(done.stdout)
  if done.returncode or not found:
    print(f"  8B compile of {variant} failed (exit {done.returncode}): "
          f"{(done.stderr.strip().splitlines() or [''])[-1]}", flush=True)
    return None
  return float(found.group(1))


def table(results: dict, compiled: dict, clip_passes: dict, tasks, variants, steps: int) -> str:
  head = ["variant", "visual tokens / image", "CLIP passes / image"]
  head += [f"{t} accuracy" for t in tasks] + [f"{t} step (s)" for t in tasks]
  head += ["8B stage-2 step, GiB / device (fsdp=8)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  for v in variants:
    tokens = sorted({results[t][v]["visual_tokens"] for t in tasks})
    cells = [f"`{v}`: {LABELS.get(v, v)}", " / ".join(f"{x:g}" for x in tokens),
             fmt(clip_passes.get(v), "d")]
    cells += [fmt(results[t][v]["accuracy"], ".3f") for t in tasks]
    cells += [fmt(results[t][v]["step_s"], ".3f") for t in tasks]
    cells.append(fmt(compiled.get(v), ".2f"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + f"\n\n{steps} steps of 8 rows each, chance 0.25.\n"


def plot(results: dict, tasks, variants, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  labels: dict[tuple[float, float], list[str]] = {}  # one label block per point
  for task, marker in zip(tasks, "os"):
    for v in variants:
      r = results[task][v]
      ax.scatter(r["visual_tokens"], r["accuracy"], marker=marker, s=60,
                 label=task if v == variants[0] else None, color="C0" if task == tasks[0]
                 else "C1", alpha=0.7)
      labels.setdefault((r["visual_tokens"], r["accuracy"]), []).append(f"{v} ({task})")
  for (x, y), names in labels.items():
    ax.annotate("\n".join(names), (x, y), fontsize=8, xytext=(6, -4), textcoords="offset points",
                va="top" if y > 0.5 else "bottom")
  ax.legend(title="task", fontsize=8)
  ax.axhline(0.25, color="grey", lw=0.8, ls="--")
  ax.set_xlabel("visual tokens per image")
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_title("Synthetic fine-detail task: accuracy vs visual tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "strategies"))
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--heldout", type=int, default=256)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--no-compile-8b", dest="compile_8b", action="store_false")
  parser.add_argument("--reduced", action="store_true",
                      help="a few steps and held-out records, no 8B compile (for the test)")
  args = parser.parse_args(argv)
  if args.reduced:
    args.steps, args.heldout, args.compile_8b = 4, 4, False
  tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    parser.error(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
  os.makedirs(args.out, exist_ok=True)
  data_dir = os.path.join(args.out, "data", "wide")
  if "wide" in tasks:
    write_wide_data(data_dir, args.steps * 8, 0)

  variants, results = [], {t: {} for t in tasks}
  for v in args.variants.split(","):
    if variant_config(v, tasks[0], args.steps, data_dir) is None:
      print(f"skipping {v}: this infllava_jax has no variant or synthetic preset {v!r} "
            f"(its variants: {', '.join(infllava.VARIANTS)})", flush=True)
      continue
    variants.append(v)
    for task in tasks:
      config = variant_config(v, task, args.steps, data_dir)
      workdir = os.path.join(args.out, "runs", f"{task}-{v}")
      if os.path.exists(workdir):
        import shutil
        shutil.rmtree(workdir)  # same steps and seed from scratch, never a resumed run
      print(f"training {v} on {task} ({args.steps} steps)...", flush=True)
      r = train_and_measure(config, workdir, task, args.heldout)
      results[task][v] = r
      print(f"  {v} {task}: accuracy {r['accuracy']:.3f}, {r['visual_tokens']:g} visual "
            f"tokens/image, step {r['step_s'] if r['step_s'] is None else round(r['step_s'], 4)}"
            f" s, train {r['train_s']:.0f} s", flush=True)
  compiled = {}
  if args.compile_8b:
    for v in variants:
      print(f"compiling the 8B stage-2 step of {v} (fsdp=8, simulated CPU devices)...",
            flush=True)
      compiled[v] = compile_8b(v)
  clip_passes = {v: views_per_image(v) for v in variants}
  text = table(results, compiled, clip_passes, tasks, variants, args.steps)
  with open(os.path.join(args.out, "strategies.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out, "strategies.json"), "w") as f:
    json.dump({"steps": args.steps, "heldout": args.heldout, "results": results,
               "clip_passes": clip_passes, "compile_8b_gib": compiled}, f, indent=1)
  plot(results, tasks, variants, os.path.join(args.out, "strategies.png"))
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
