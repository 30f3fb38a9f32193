"""Time of the metadata pass (data/checks.py) on a LLaVA-665K-sized JSON, on one core.

    python bench/data_checks.py [--records 665000] [--text_fraction 0.06] [--bad 100]

Writes a generated LLaVA JSON (1 to 10 question/answer pairs per record, ~6% text-only as
in llava_v1_5_mix665k.json) and one empty file per image record in five folders (the
mix's coco/gqa/ocr_vqa/textvqa/vg), then times `json.load` and `checks.find_problems`
apart: wall-clock, and CPU time of this process (the figure to trust on a shared machine).
`--bad` records lose their image file, so the pass has something to find. The pass runs
twice: with the file checks, then as for images on a bucket (no file checks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

# Runnable as a plain script from a checkout (the package need not be installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infllava_jax.data import checks  # noqa: E402

FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images",
           "vg/VG_100K")


def generate(records: int, text_fraction: float, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for i in range(records):
    pairs = rng.randint(1, 10)
    conv = []
    for p in range(pairs):
      conv.append({"from": "human", "value": f"What is object {p} doing in the scene?"})
      conv.append({"from": "gpt", "value": "It is sitting on a red chair by the window."})
    record = {"id": f"{i:09d}", "conversations": conv}
    if rng.random() >= text_fraction:
      record["image"] = f"{FOLDERS[i % len(FOLDERS)]}/{i:09d}.jpg"
      conv[0]["value"] = "<image>\n" + conv[0]["value"]
    out.append(record)
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--records", type=int, default=665_000)
  parser.add_argument("--text_fraction", type=float, default=0.06)
  parser.add_argument("--bad", type=int, default=100, help="image files left out")
  args = parser.parse_args(argv)
  records = generate(args.records, args.text_fraction)
  with tempfile.TemporaryDirectory() as root:
    images = os.path.join(root, "images")
    for folder in FOLDERS:
      os.makedirs(os.path.join(images, folder))
    with_image = [r["image"] for r in records if "image" in r]
    for rel in with_image[args.bad:]:
      open(os.path.join(images, rel), "wb").close()
    path = os.path.join(root, "data.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(records, f)
    del records
    size = os.path.getsize(path)
    start, cpu = time.perf_counter(), time.process_time()
    with open(path, encoding="utf-8") as f:
      loaded = json.load(f)
    parse, parse_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    problems = checks.find_problems(loaded, images, template="llama3", text_only=False)
    check, check_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    checks.find_problems(loaded, "gs://bucket/images", template="llama3", text_only=False)
    fields, fields_cpu = time.perf_counter() - start, time.process_time() - cpu
  print(f"{len(loaded):,} records ({len(with_image):,} with an image in {len(FOLDERS)} "
        f"folders), {size / 2**20:.0f} MiB of JSON")
  print(f"json.load {parse:.2f} s wall, {parse_cpu:.2f} s CPU; metadata pass {check:.2f} s wall, {check_cpu:.2f} s CPU "
        f"({1e6 * check_cpu / len(loaded):.1f} us/record), {len(problems)} bad records found; "
        f"without the file checks (a bucket) {fields:.2f} s wall, {fields_cpu:.2f} s CPU")
  assert len(problems) == args.bad
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
