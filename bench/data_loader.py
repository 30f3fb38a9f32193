"""Input pipeline throughput beside the train step's consumption, in one run.

    python bench/data_loader.py [--config configs/synthetic.py[:arg]] [--batches N]
                                [--config.data.worker_count=2 ...]

Prints samples/s of the grain pipeline on the config's data (default: the synthetic set)
and samples/s the real train step consumes on the same config, and their ratio (goal >= 3x).

    python bench/data_loader.py --stage2 [--records 256] [--workers 0,1,2] [--batches 16]
                                [--slice v5p-128] [--mfu 0.4] [--data_dir DIR]

The stage-2 host bench: writes `--records` LLaVA records (photo-like JPEGs, see
`photo_like`) as a JSON + image folder, packs them (`infllava data pack`), and times the
`infllava_8b_stage2` data config (1008 px DCM input, "pad" aspect, 2048 tokens, one host's
share of the global batch of 128 on the slice; the shipped small tokenizer) on both sources
and each worker count. It prints that against the samples/s one host of the slice must
deliver at the stated MFU (step FLOPs from `training.flops.train_step_flops`), the
headroom, and the cores a host needs for 3x headroom from the per-core figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

# Runnable as a plain script from a checkout (the package need not be installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infllava_jax.config import load_config  # noqa: E402
from infllava_jax.data import pack, pipeline  # noqa: E402
from infllava_jax.model.infllava import num_image_tokens  # noqa: E402
from infllava_jax.training import flops  # noqa: E402

# TPU v5p slices: v5p-N has N TensorCores, N/2 chips, 4 chips per host VM (208 vCPUs each).
V5P_CHIPS_PER_HOST = 4
V5P_HOST_VCPUS = 208
V5P_DEVICE_KIND = "TPU v5"  # jax's device_kind on v5p
TARGET_HEADROOM = 3.0
WARMUP_BATCHES = 4  # --stage2: untimed batches first, to drain the workers' prefetch


def pipeline_samples_per_s(config, batches: int) -> float:
  """Samples/s out of the pipeline, after one warm-up batch (worker start-up excluded)."""
  return pipeline_rates(config, batches)[0]


def pipeline_rates(config, batches: int, process_count: int = 1,
                   warmup: int = 1) -> tuple[float, float]:
  """(samples/s, samples per CPU-second of this process and its grain workers) out of the
  pipeline of process 0 of `process_count`, timed after `warmup` batches (enough of them
  also drain what the workers prefetched while starting, which would flatter the rate)."""
  it = pipeline.make_iterator(config, process_index=0, process_count=process_count)
  for _ in range(warmup):
    next(it)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    batch = next(it)
  elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  it.close()
  samples = batches * len(batch["tokens"])
  return samples / elapsed, samples / cpu


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live descendants (grain's workers),
  from /proc (Linux): a finished child's time would only count once it is reaped."""
  tick = os.sysconf("SC_CLK_TCK")
  parent, cpu = {}, {}
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
    except OSError:  # gone meanwhile
      continue
    parent[int(pid)] = int(fields[1])                           # ppid
    cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
  def descends(pid):
    while pid > 1:
      pid = parent.get(pid, 0)
      if pid == os.getpid():
        return True
    return False
  return time.process_time() + sum(t for pid, t in cpu.items() if descends(pid))


def train_step_samples_per_s(config, batches: int) -> float:
  """Samples/s the jit-compiled train step consumes on this config (one fixed batch).

  The step is the real one (`training.loop.Trainer`), compiled and warmed up once, then
  timed over `batches` steps with a sync at the end only, as the train loop runs it.
  """
  import jax
  from infllava_jax.training import loop

  with tempfile.TemporaryDirectory() as workdir:
    trainer = loop.Trainer(config, workdir)
    batch = loop.global_batch_from_host(next(trainer.data), trainer.mesh)
    state, metrics = trainer.step_fn(trainer.state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(batches):
      state, metrics = trainer.step_fn(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    trainer.data.close()
  return batches * trainer.global_batch / elapsed


def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> np.ndarray:
  """A smooth uint8 [height, width, 3] image: a few low-frequency colour waves under soft
  discs. Its JPEG decodes about as fast as a photo's (random noise would decode slower)."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
  image = np.zeros((height, width, 3), np.float32)
  for _ in range(4):
    fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
    image += np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None] * rng.uniform(10, 40, 3)
  for _ in range(6):
    cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.75), rng.uniform(0.03, 0.2)
    soft = np.clip((r - np.hypot(x - cx, y - cy)) / (0.3 * r), 0, 1)[..., None]
    image = image * (1 - soft) + soft * (rng.uniform(-100, 100, 3) + image * 0.2)
  return np.clip(image + 128, 0, 255).astype(np.uint8)


def write_llava_set(out: str, records: int, seed: int = 0) -> tuple[str, str]:
  """`records` LLaVA records, each a 640x480 JPEG (quality 90) and a two-turn conversation
  of LLaVA-Instruct length; returns (json path, image folder)."""
  from PIL import Image
  folder = os.path.join(out, "images")
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  answer = ("The picture shows a street scene on a sunny afternoon. A red bus waits at the "
            "stop while people cross at the lights, and a cyclist passes on the right. ") * 2
  rows = []
  for i in range(records):
    name = f"{i:06d}.jpg"
    buf = io.BytesIO()
    Image.fromarray(photo_like(rng)).save(buf, format="JPEG", quality=90)
    with open(os.path.join(folder, name), "wb") as f:
      f.write(buf.getvalue())
    rows.append({"id": f"bench-{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is happening in this picture?"},
        {"from": "gpt", "value": answer},
        {"from": "human", "value": "How many vehicles can you see?"},
        {"from": "gpt", "value": f"I can see {i % 5 + 1} vehicles: a bus and some cars."}]})
  json_path = os.path.join(out, "llava.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(rows, f)
  return json_path, folder


def host_samples_needed(config, chips: int, mfu: float) -> tuple[float, float, float]:
  """(step FLOPs, step seconds, samples/s one v5p host must deliver) for `config`'s train
  step on `chips` v5p chips at `mfu`, the step's FLOPs from the analytic formula."""
  batch = config.train.global_batch_size
  # The trainable modules' path prefixes, from train.trainable's regexes ("^llm/" -> "llm/").
  trainable = [r.lstrip("^") for r in config.train.trainable]
  step_flops = flops.train_step_flops(
      config.model, batch, config.data.max_length, batch * config.data.max_images_per_row,
      num_image_tokens(config.model), trainable)
  step_s = step_flops / (chips * flops.PEAK_FLOPS[V5P_DEVICE_KIND] * mfu)
  return step_flops, step_s, batch / step_s / (chips // V5P_CHIPS_PER_HOST)


def stage2_bench(args, chips: int) -> int:
  hosts = chips // V5P_CHIPS_PER_HOST
  config = load_config("infllava_8b_stage2")
  config.data.tokenizer_path = None  # the shipped BPE: tokenising is a small part of a sample
  step_flops, step_s, needed = host_samples_needed(config, chips, args.mfu)
  with tempfile.TemporaryDirectory() as tmp:
    out = args.data_dir or tmp
    start = time.perf_counter()
    json_path, folder = write_llava_set(out, args.records)
    packed = os.path.join(out, "packed")
    pack.pack(json_path, folder, packed, num_shards=4, progress=lambda _: None)
    print(f"data: {args.records} records, 640x480 JPEG q90 photo-like, written and packed "
          f"in {time.perf_counter() - start:.1f} s")
    results = {}
    for source, fields in (("llava_json", {"json_path": json_path, "image_folder": folder}),
                           ("array_record", {"path": packed})):
      for workers in args.workers:
        cfg = load_config("infllava_8b_stage2")
        cfg.data.update(dict(source=source, tokenizer_path=None, worker_count=workers,
                             **fields))
        results[source, workers] = pipeline_rates(cfg, args.batches, hosts,
                                                  warmup=WARMUP_BATCHES)
  print(f"\nstage-2 input ({config.model.dcm.image_size} px, aspect "
        f"{config.data.image_aspect!r}, {config.data.max_length} tokens, "
        f"{config.train.global_batch_size // hosts} rows/host, read_threads="
        f"{config.data.read_threads}), {args.batches} batches after {WARMUP_BATCHES}, "
        f"{os.cpu_count()} CPU cores here")
  print(f"{'source':<14}{'workers':>8}{'samples/s':>11}{'per core':>10}{'headroom':>10}")
  for (source, workers), (rate, per_cpu) in results.items():
    print(f"{source:<14}{workers:>8}{rate:>11.1f}{per_cpu:>10.1f}{rate / needed:>9.1f}x")
  per_core = min(per_cpu for _, per_cpu in results.values())
  print(f"per core: samples per CPU-second of the main process and its workers; headroom: "
        f"samples/s here / the {needed:.1f} samples/s one host must deliver:\n"
        f"  {args.slice} ({chips} chips, {hosts} hosts of {V5P_CHIPS_PER_HOST}), global batch "
        f"{config.train.global_batch_size} x {config.data.max_length} tokens, "
        f"{step_flops / 1e15:.1f} PFLOP/step at {args.mfu:.0%} MFU of "
        f"{flops.PEAK_FLOPS[V5P_DEVICE_KIND] / 1e12:.0f} TFLOP/s/chip: {step_s:.2f} s/step")
  print(f"{TARGET_HEADROOM:.0f}x headroom needs {TARGET_HEADROOM * needed / per_core:.1f} "
        f"cores per host (at the lowest per-core figure, {per_core:.1f}) of its "
        f"{V5P_HOST_VCPUS} vCPUs")
  return 0


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--batches", type=int, help="timed batches (default 20; --stage2 16)")
  parser.add_argument("--stage2", action="store_true",
                      help="the stage-2 host bench (see above) instead of the config's")
  parser.add_argument("--records", type=int, default=256)
  parser.add_argument("--workers", default="0,1,2",
                      help="comma-separated data.worker_count values (--stage2)")
  parser.add_argument("--slice", default="v5p-128", help="v5p-N (N TensorCores, --stage2)")
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--data_dir", help="where --stage2 writes its data (default: a temp dir)")
  args, overrides = parser.parse_known_args(argv)
  if args.stage2:
    args.batches = args.batches or 16
    args.workers = [int(w) for w in args.workers.split(",")]
    name, _, tensorcores = args.slice.partition("-")
    if name != "v5p" or not tensorcores.isdigit() or int(tensorcores) % 8:
      parser.error(f"--slice: expected v5p-N with N TensorCores a multiple of 8 (whole "
                   f"hosts of {V5P_CHIPS_PER_HOST} chips), got {args.slice!r}")
    return stage2_bench(args, chips=int(tensorcores) // 2)
  args.batches = args.batches or 20
  config = load_config(args.config, overrides)
  data = pipeline_samples_per_s(config, args.batches)
  step = train_step_samples_per_s(config, args.batches)
  print(f"pipeline: {data:8.1f} samples/s  (workers={config.data.worker_count}, "
        f"batch={config.data.batch_size}, packing={config.data.packing}, "
        f"image={config.model.dcm.image_size}px)")
  print(f"train step: {step:8.1f} samples/s\nratio pipeline/step: {data / step:.2f}x "
        "(goal >= 3x)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
