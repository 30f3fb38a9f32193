"""Peak host memory of `infllava convert` both ways on a >= 4 GB bf16 release checkpoint.

Writes a synthetic INF-LLaVA release (LLaMA-shaped LLM: width 2048, 22 layers, vocabulary
128257; a CLIP-L/14-336 copy; DEM; projector) as bf16 safetensors shards + index into a
temp folder, converts it with the real CLI in a subprocess (`from-pytorch`), exports the
result back (`to-pytorch`, 1 GB shards) in another, and prints each subprocess's peak RSS
beside the checkpoint size. The bounds it checks:
  from-pytorch: peak RSS <= 1.5 GB + 2 x the largest tensor;
  to-pytorch:   peak RSS <= 1.5 GB + the largest param (a stacked layer tensor) + 2 x the
                shard size (the shard being written and its serialised copy).
Everything written is deleted at the end.

  python bench/convert_memory.py [--layers 22] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from infllava_jax.config import load_config  # noqa: E402
from infllava_jax.convert import mapping, plan, readers, sources  # noqa: E402
from infllava_jax.convert.llama_table import llama_config_from_hf  # noqa: E402

GB = 1e9


def llm_config(layers: int) -> dict:
  return dict(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
              vocab_size=128257, hidden_size=2048, intermediate_size=8192,
              num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
              head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
              max_position_embeddings=8192, torch_dtype="bfloat16", tie_word_embeddings=False,
              mm_hidden_size=1024, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
              mm_vision_select_feature="patch", mm_vision_tower="openai/clip-vit-large-patch14-336")


def release_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """Every release tensor's PyTorch name and shape, from the converter's own table."""
  model_cfg = load_config("configs/infllava_8b.py").model
  model_cfg.llm = llama_config_from_hf(config)
  expected = flatten_dict(plan.expected_params(model_cfg), sep="/")
  shapes = {}
  for rule in sources.release_table(model_cfg):
    shape = expected[rule.path].shape
    if rule.stacked:
      for i in range(shape[0]):
        shapes[rule.torch_name(i)] = mapping.torch_shape(rule, shape[1:])
    else:
      shapes[rule.torch] = mapping.torch_shape(rule, shape)
  # The CLIP layer past the feature layer and post_layernorm: in a release, not loaded.
  clip = sources.RELEASE_CLIP + "vision_model."
  last = model_cfg.vision.depth - 1
  for name, shape in list(shapes.items()):
    if name.startswith(f"{clip}encoder.layers.0."):
      shapes[name.replace("layers.0.", f"layers.{last}.")] = shape
  shapes[clip + "post_layernorm.weight"] = shapes[clip + "post_layernorm.bias"] = (1024,)
  return shapes


def write_release(directory: str, layers: int,
                  shard_bytes: float = 1.0 * GB) -> tuple[int, int, int]:
  """bf16 shards of random bits (incompressible, like real weights).

  Returns (total bytes, largest tensor bytes, number of shards).
  """
  config = llm_config(layers)
  shapes = release_shapes(config)
  noise = np.random.default_rng(0).integers(0, 2**16, 2**25, dtype=np.uint16)  # 64 MB
  def tensor(shape):
    n = int(np.prod(shape))
    bits = np.resize(noise, n) if n > noise.size else noise[:n].copy()
    return bits.view(ml_dtypes.bfloat16).reshape(shape)
  names = sorted(shapes)
  groups, current, size = [], [], 0
  for name in names:
    nbytes = int(np.prod(shapes[name])) * 2
    if current and size + nbytes > shard_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  groups.append(current)
  weight_map = {}
  for i, group in enumerate(groups, 1):
    file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
    save_file({n: tensor(shapes[n]) for n in group}, os.path.join(directory, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in group})
  total = sum(int(np.prod(s)) * 2 for s in shapes.values())
  with open(os.path.join(directory, readers.INDEX_FILES[0]), "w") as f:
    json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return total, max(int(np.prod(s)) * 2 for s in shapes.values()), len(groups)


def peak_rss(argv: list[str]) -> tuple[float, float]:
  """(peak RSS in bytes, seconds) of `infllava ARGV` run in a fresh Python process."""
  probe = ("import resource, sys\n"
           "from infllava_jax.cli import main\n"
           "code = main(sys.argv[1:])\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
           "sys.exit(code)\n")
  start = time.time()
  out = subprocess.run([sys.executable, "-c", probe, *argv], check=True, cwd=REPO,
                       capture_output=True, text=True).stdout
  return float(out.split()[-1]), time.time() - start  # ru_maxrss is in KiB on Linux


def largest_param_bytes(converted: str) -> int:
  from infllava_jax.checkpoints import params
  return max(int(np.prod(p.shape)) * p.dtype.itemsize
             for p in params.lazy_params(converted).values())


def folder_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=22, help="LLM layers (22: ~4.3 GB)")
  parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files")
  args = parser.parse_args()
  work = args.keep or tempfile.mkdtemp(prefix="convert_memory_", dir=os.environ.get("TMPDIR"))
  release, out, exported = (os.path.join(work, name)
                            for name in ("release", "converted", "exported"))
  os.makedirs(release, exist_ok=True)
  try:
    start = time.time()
    total, largest, shards = write_release(release, args.layers)
    print(f"wrote a synthetic bf16 release: {total / GB:.2f} GB in {shards} shards, largest "
          f"tensor {largest / GB:.3f} GB ({time.time() - start:.0f} s)", flush=True)
    peak, seconds = peak_rss(["convert", "from-pytorch", "--model", release, "--out", out,
                              "--quiet"])
    bound = 1.5 * GB + 2 * largest
    print(f"checkpoint      {total / GB:8.2f} GB  ({shards} shards)")
    print(f"largest tensor  {largest / GB:8.3f} GB")
    print(f"converted       {folder_bytes(out) / GB:8.2f} GB on disk, {seconds:.0f} s "
          f"({total / GB / seconds:.2f} GB/s)")
    ok = peak <= bound
    print(f"from-pytorch peak RSS {peak / GB:6.2f} GB = {peak / total:.2f} x the checkpoint; "
          f"bound 1.5 GB + 2 x largest = {bound / GB:.2f} GB: {'OK' if ok else 'OVER'}",
          flush=True)
    shard = 1.0 * GB
    peak, seconds = peak_rss(["convert", "to-pytorch", "--checkpoint", out, "--out", exported,
                              "--max-shard-size", str(shard / GB), "--quiet"])
    param = largest_param_bytes(out)
    bound = 1.5 * GB + param + 2 * shard
    print(f"to-pytorch   peak RSS {peak / GB:6.2f} GB = {peak / total:.2f} x the checkpoint, "
          f"{seconds:.0f} s; bound 1.5 GB + largest param {param / GB:.2f} GB + 2 x "
          f"{shard / GB:.0f} GB shards = {bound / GB:.2f} GB: "
          f"{'OK' if peak <= bound else 'OVER'}")
    ok = ok and peak <= bound
    return 0 if ok else 1
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
