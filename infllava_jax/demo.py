"""`infllava demo`: build a model from a config and run one image+text forward pass.

A smoke test a newcomer can run in seconds: it shows the shapes flowing through DCM, CLIP,
DEM, the projector and the LLM for any config, with random weights.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax.config import config_help, load_config
from infllava_jax.model import dcm, infllava


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="infllava demo", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny",
                      help=config_help("tiny:llava") + " (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=2, help="rows in the batch (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
  args, overrides = parser.parse_known_args(argv)
  cfg = load_config(args.config, overrides).model
  model = infllava.build_model(cfg)
  n_img = infllava.num_image_tokens(cfg)
  side = infllava.input_size(cfg)
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(1, cfg.llm.vocab_size, size=(args.batch, n_img + 16)).astype(np.int32)
  tokens[:, 1:1 + n_img] = cfg.image_token_id
  pixels = rng.normal(size=(args.batch, 1, side, side, 3)).astype(np.float32)

  start = time.perf_counter()
  params = jax.jit(model.init)(jax.random.key(args.seed), *infllava.dummy_inputs(cfg))
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"config {args.config}: variant={cfg.variant}, {count:,} parameters "
        f"(init {time.perf_counter() - start:.1f}s)")
  if cfg.variant == "infllava":
    views = dcm.views(jnp.asarray(pixels[:, 0]), cfg)
    print(f"DCM: image {side}x{side} -> {views.shape[1]} CLIP views of "
          f"{views.shape[2]}x{views.shape[3]}")
  start = time.perf_counter()
  logits, _ = jax.jit(model.apply)(params, jnp.asarray(tokens), jnp.asarray(pixels))
  logits.block_until_ready()
  print(f"forward: tokens {tokens.shape} with {n_img} image slots per row, pixels "
        f"{pixels.shape} -> logits {logits.shape} ({time.perf_counter() - start:.1f}s "
        "incl. compile)")
  print("next-token argmax per row:", np.asarray(jnp.argmax(logits[:, -1], axis=-1)).tolist())
  return 0
