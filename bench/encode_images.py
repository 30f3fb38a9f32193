"""encode_images: the reduced DEM path vs the literal 19-pass path, and our CLIP vs HF's.

    python bench/encode_images.py [--repeats 5]

1. The same INF-LLaVA weights encode the same images with `model.dem.reduced_path` on
   (CLIP on 10 views, 64 queries per block) and off (the literal 18 views and 18 windows);
   outputs must agree to 1e-5 (target: reduced >= 1.8x faster).
2. Our CLIP tower vs Hugging Face `CLIPVisionModel` (sdpa) on the same sub-image batch with
   the same weights (target: ours >= 0.9x HF's speed). Both run the layers up to the
   feature layer (-2: all but the last); the reference's full `CLIPVisionModel` also runs
   the last layer and drops it, which would flatter ours by a quarter at this depth (4%
   at the released 24 layers).

Shapes are the released ones where it matters for the ratio (336 px views, 24x24 patches,
a 3x3 grid at 1008 px) with a narrower, shallower tower so it runs in minutes on 2 cores.
Timings are interleaved in one process and reported as medians and ratios, float32. Ours
compiles with `xla_options.compiler_options`, as the Trainer and `generate` do (on CPU: no
YNNPACK fusions); the CLIP comparison also times our tower under XLA's default options.

Results: docs/performance.md#encoding-images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import flax.linen as nn  # noqa: E402

from infllava_jax import xla_options  # noqa: E402
from infllava_jax.config import load_config  # noqa: E402
from infllava_jax.convert import mapping  # noqa: E402
from infllava_jax.convert.clip_table import clip_table, clip_unused  # noqa: E402
from infllava_jax.model import clip, infllava  # noqa: E402

OUR_OPTIONS = xla_options.compiler_options(jax.default_backend())


def bench_config(reduced: bool):
  cfg = load_config("configs/infllava_8b.py").model
  cfg.vision.update(dict(width=256, depth=4, heads=4, mlp_dim=1024))
  cfg.dem.heads = 8
  cfg.dem.reduced_path = reduced
  cfg.dtype = "float32"
  cfg.llm.update(dict(vocab_size=256, width=256, depth=1, heads=4, kv_heads=2, head_dim=64,
                      mlp_dim=512))
  return cfg


def interleaved(fns: dict, repeats: int) -> dict:
  """Median seconds of each fn, timed round-robin so machine noise hits all alike."""
  for fn in fns.values():
    fn()  # compile / warm up
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def dem_paths(repeats: int, batch: int) -> bool:
  fast_cfg, slow_cfg = bench_config(True), bench_config(False)
  fast, slow = infllava.build_model(fast_cfg), infllava.build_model(slow_cfg)
  params = fast.init(jax.random.key(0), *infllava.dummy_inputs(fast_cfg))["params"]
  side = fast_cfg.dcm.image_size
  pixels = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side, side, 3)), jnp.float32)
  encode = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x,
                                                  method=infllava.InfLlava.encode_images),
                             compiler_options=OUR_OPTIONS)
  run_fast, run_slow = encode(fast), encode(slow)
  a = run_fast(params, pixels).block_until_ready()
  b = run_slow(params, pixels).block_until_ready()
  err = float(jnp.max(jnp.abs(a - b)))
  t = interleaved({"reduced": lambda: run_fast(params, pixels).block_until_ready(),
                   "literal": lambda: run_slow(params, pixels).block_until_ready()}, repeats)
  print(f"[DEM] encode_images, {batch} image(s) of {side}px, ViT width "
        f"{fast_cfg.vision.width} x {fast_cfg.vision.depth} layers:")
  print(f"  literal (18 views, 18 windows): {t['literal'] * 1e3:8.1f} ms")
  print(f"  reduced (10 views, 64-query blocks): {t['reduced'] * 1e3:8.1f} ms")
  print(f"  speed-up reduced/literal: {t['literal'] / t['reduced']:.2f}x (target >= 1.8x); "
        f"max |difference| {err:.2e} (must be <= 1e-5)")
  return err <= 1e-5


def clip_vs_hf(repeats: int, batch: int) -> None:
  cfg = bench_config(True).vision
  used = clip.num_used_layers(cfg)
  hf_cfg = transformers.CLIPVisionConfig(
      hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=used,
      num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
      hidden_act="quick_gelu", layer_norm_eps=cfg.layer_norm_eps, attn_implementation="sdpa")
  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(hf_cfg).eval()
  tower = clip.VisionTransformer(cfg)
  side = cfg.image_size
  expected = jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  # transformers 5's CLIPVisionModel drops the `vision_model.` prefix the table expects.
  state = [("vision_model." + k.removeprefix("vision_model."), v.numpy())
           for k, v in hf.state_dict().items()]
  params = mapping.torch_to_params(state, clip_table(cfg), nn.meta.unbox(expected["params"]),
                                   ignore=clip_unused(cfg), source="bench CLIP")
  images = np.random.default_rng(1).normal(size=(batch, side, side, 3)).astype(np.float32)
  forward = lambda p, x: tower.apply({"params": p}, x)
  ours = jax.jit(forward, compiler_options=OUR_OPTIONS)
  xla_defaults = jax.jit(forward)
  x_jax = jnp.asarray(images)
  x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

  def run_hf():
    with torch.inference_mode():
      return hf(pixel_values=x_torch).last_hidden_state[:, 1:]  # no post_layernorm here

  err = float(np.max(np.abs(np.asarray(ours(params, x_jax)) - run_hf().numpy())))
  t = interleaved({"ours": lambda: ours(params, x_jax).block_until_ready(), "hf": run_hf,
                   "defaults": lambda: xla_defaults(params, x_jax).block_until_ready()},
                  repeats)
  print(f"[CLIP] {batch} sub-images of {side}px, width {cfg.width}, {used} layers "
        f"(torch threads {torch.get_num_threads()}):")
  print(f"  HF CLIPVisionModel (sdpa): {t['hf'] * 1e3:8.1f} ms")
  print(f"  ours:                      {t['ours'] * 1e3:8.1f} ms (XLA options "
        f"{OUR_OPTIONS or 'none'})")
  print(f"  ours, XLA's default options: {t['defaults'] * 1e3:6.1f} ms "
        f"({t['hf'] / t['defaults']:.2f}x HF)")
  print(f"  speed ours/HF: {t['hf'] / t['ours']:.2f}x (target >= 0.9x); max |difference| "
        f"{err:.2e}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=1, help="images for the DEM comparison")
  parser.add_argument("--clip-batch", type=int, default=10, help="sub-images for the CLIP one")
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  outputs_equal = dem_paths(args.repeats, args.batch)
  clip_vs_hf(args.repeats, args.clip_batch)
  return 0 if outputs_equal else 1


if __name__ == "__main__":
  sys.exit(main())
