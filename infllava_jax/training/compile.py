"""`infllava compile`: ahead-of-time compile the real train step at full size, on this machine.

  infllava compile --config infllava_8b_stage2 --mesh fsdp=8 \\
      [--batch 1] [--length 2048] [--grad-accum 1] [--device-memory 80GiB] [--config.a.b=v ...]
  infllava compile --config infllava_8b_stage1 --topology v5p:2x2x2 \\
      --device-memory 95GiB                    # for a TPU slice, on this machine (libtpu)
  infllava compile --inference --config infllava_8b --quantize int8 --device-memory 16GiB
                                               # generation on one device: inference_compile.py

Nothing of model size is ever allocated: the state is the trainer's abstract state
(`training.state.train_setup`: `jax.eval_shape` of `model.init` and `tx.init`, placed by the
config's `sharding.rules`), the batch is `ShapeDtypeStruct`s, and the trainer's own jitted
step (`training.state.jit_train_step`: same shardings, donation and compiler options as
`training.loop.Trainer`) is lowered and compiled for a mesh of simulated CPU devices
(`--xla_force_host_platform_device_count`, one per mesh position). XLA's SPMD partitioner
works the same for any backend, so the per-device buffer sizes it reports are those of the
partitioned program; temporaries differ somewhat on GPU/TPU (fusion and layout choices).
With `--topology` (a TPU slice such as v5e:2x4, v5p:2x2x2 or v4:2x2x2) the step is compiled
by the TPU compiler itself, through libtpu's compile-only client: no TPU is needed, only
the libtpu package (`pip install 'infllava-jax[tpu]'`). Those figures are the TPU's own.

Printed: per-device memory from XLA (arguments, outputs, donated aliasing, temporaries,
generated code, total), an analytic lower bound per device (params + gradients + AdamW
state as the shardings place them, the batch, the activations the remat policy must keep,
the float32 logits of the loss chunk or vocabulary block the loss holds) and compiled /
bound, and FLOPs per step from XLA beside `training/flops.py`'s formula. Exits 1 when the
total exceeds --device-memory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from infllava_jax.aot import (GIB, available_devices, format_bytes, mesh_device_count, parse_size,
                              request_cpu_devices, topology_devices)
from infllava_jax.config import (config_help, load_config,  # imports no jax
                                 parse_args_and_overrides)


def shard_bytes(leaf) -> int:
  """Bytes one device holds of `leaf` (a ShapeDtypeStruct carrying a sharding); 4-bit
  values at half a byte (a QLoRA base's), as XLA packs them on TPU and GPU."""
  import jax
  shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
  return math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8


def tree_shard_bytes(tree: Any) -> int:
  import jax
  return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def abstract_batch(config, mesh, rules, rows: int, length: int) -> dict:
  """The data pipeline's batch as ShapeDtypeStructs sharded as the trainer's
  (`state.batch_shardings`): [rows, length] ids, weights and pixels [rows, M, S, S, 3]
  float32 (M = data.max_images_per_row; llava_next: `infllava.pixels_shapes`' tiles and
  layouts)."""
  import jax
  import jax.numpy as jnp
  from infllava_jax.model.infllava import pixels_shapes
  from infllava_jax.training.state import batch_shardings
  shapes = {"tokens": ((rows, length), jnp.int32), "targets": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.float32),
            "positions": ((rows, length), jnp.int32),
            "segment_ids": ((rows, length), jnp.int32)}
  placed = batch_shardings(mesh, rules, config.model)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=placed[k])
           for k, (shape, dtype) in shapes.items()}
  batch["pixels"] = jax.tree.map(
      lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
      pixels_shapes(config.model, rows, config.data.max_images_per_row), placed["pixels"])
  return batch


def activation_bound(config, mask_paths: list[str], rows_per_device: int, length: int,
                     fsdp: int, tensor: int) -> list[tuple[str, int]]:
  """(label, bytes per device) of activations every remat policy must hold at once.

  Under remat each scanned layer keeps at least its input carry for the backward pass (all
  that "nothing_saveable" keeps; other policies keep more). Only towers that gradients flow
  through keep anything: the LLM always (the projector's gradient passes through it, frozen
  or not), CLIP only when one of its params trains. The loss holds float32 logits for
  `train.loss_chunk` tokens of each row at a time (all T when 0), vocabulary-parallel: the
  rows of every fsdp shard, the vocabulary split over fsdp x tensor (`loss_vocab`); or, with
  `train.loss_vocab_block` on a mesh without `tensor`, for every token of the device's rows
  and one block of the vocabulary.
  """
  import jax.numpy as jnp
  from infllava_jax.model import clip, infllava
  from infllava_jax.training import optim
  model = config.model
  compute = jnp.dtype(model.dtype)
  llm = model.llm
  terms = [(f"carry: {llm.depth} LLM layers x [{rows_per_device}, {length}, {llm.width}] "
            f"{compute.name}", llm.depth * rows_per_device * length * llm.width * compute.itemsize)]
  if any(p.startswith("vision/") for p in mask_paths):
    v = model.vision
    views = infllava.num_views(model)
    images = rows_per_device * config.data.max_images_per_row * views
    used, tokens = clip.num_used_layers(v), clip.num_patches(v) + 1
    terms.append((f"carry: {used} CLIP layers x [{images}, {tokens}, {v.width}] {compute.name}",
                  used * images * tokens * v.width * compute.itemsize))
  block = optim.vocab_block(config.train, tensor)  # lm_head's vocabulary is split over tensor
  if block > 0:  # `optim.blockwise_cross_entropy`
    rows, tokens, vocab = rows_per_device, length, min(block, llm.vocab_size)
  else:
    chunk = config.train.get("loss_chunk", 0)
    rows, tokens = rows_per_device * fsdp, (min(chunk, length) if chunk > 0 else length)
    vocab = -(-llm.vocab_size // (fsdp * tensor))
  terms.append((f"logits [{rows}, {tokens}, {vocab}] float32", rows * tokens * vocab * 4))
  return terms


def compile_train_step(config, devices: list, rows_per_shard: int, length: int,
                       log=print) -> dict:
  """Lowers and compiles the trainer's step for `config` on `devices`; returns its figures.

  rows_per_shard: rows of each micro-batch per batch shard (data x fsdp position), so the
  global batch is rows_per_shard x shards x train.grad_accum_steps.
  Returns a dict: mesh, devices, global_batch, memory (XLA's per-device bytes: arguments,
  outputs, alias, temporaries, generated_code, total), bound (list of (label, bytes per
  device)), bound_total, flops_xla (per device), flops_formula (whole step, all devices).
  """
  import jax
  from infllava_jax import sharding
  from infllava_jax.model import infllava
  from infllava_jax.training import flops, optim
  from infllava_jax.training import state as state_lib
  from infllava_jax.training.loop import batch_shards, check_divisible

  train = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  shards = batch_shards(mesh, rules)
  accum = train.grad_accum_steps
  global_batch = rows_per_shard * shards * accum
  check_divisible(global_batch, mesh, accum, rules)

  t0 = time.perf_counter()
  log(f"building abstract params ({config.model.variant}, mesh {dict(mesh.shape)})...")
  # The trainer's own setup and jitted step: only the schedule's length (no shape) differs.
  setup = state_lib.train_setup(config, mesh, int(train.get("steps") or 1000))
  state, mask = setup.abstract, setup.mask
  batch = abstract_batch(config, mesh, rules, global_batch, length)
  leaves, flags = jax.tree.leaves(state.params), jax.tree.leaves(mask)
  trainable = [x for x, m in zip(leaves, flags) if m]
  log(f"  {sum(x.size for x in leaves):,} params ({sum(x.size for x in trainable):,} "
      f"trainable), global batch {global_batch} x {length} tokens ({rows_per_shard} per "
      f"batch shard x {shards} shards x {accum} micro-batches) in "
      f"{time.perf_counter() - t0:.1f}s")

  jitted = state_lib.jit_train_step(setup, train)
  t0 = time.perf_counter()
  log("lowering...")
  with jax.set_mesh(mesh):
    lowered = jitted.lower(state, batch)
  log(f"  lowered in {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  log("compiling...")
  compiled = lowered.compile()
  log(f"  compiled in {time.perf_counter() - t0:.1f}s")

  stats = compiled.memory_analysis()
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "alias": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "generated_code": stats.generated_code_size_in_bytes}
  # Donated state buffers are reused for the new state: count them once.
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["alias"]
                     + memory["temporaries"] + memory["generated_code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  # Gradients exist for trainable params only, in their dtype and placement.
  grads = tree_shard_bytes(trainable)
  bound = [("params", tree_shard_bytes(state.params)),
           ("gradients (trainable params only)", grads)]
  if accum > 1:
    bound.append((f"gradient accumulator ({accum} micro-batches)", grads))
  bound += [("AdamW state", tree_shard_bytes(state.opt_state)),
            ("batch", tree_shard_bytes(batch))]
  paths = [p for p, m in zip(jax.tree.leaves(optim.param_paths(state.params)), flags) if m]
  bound += activation_bound(config, paths, rows_per_shard, length, mesh.shape["fsdp"],
                            mesh.shape["tensor"])
  return {
      "mesh": dict(mesh.shape), "devices": len(devices), "global_batch": global_batch,
      "device_kind": devices[0].device_kind,
      "memory": memory, "bound": bound, "bound_total": sum(b for _, b in bound),
      "flops_xla": float(cost.get("flops", 0.0)),
      "flops_formula": flops.train_step_flops(
          config.model, global_batch, length, global_batch * config.data.max_images_per_row,
          infllava.projected_tokens(config.model), paths),
  }


def report(figures: dict, limit: int | None) -> str:
  """The printed summary of `compile_train_step`'s figures."""
  mem = figures["memory"]
  lines = [f"per-device memory (XLA memory_analysis; mesh {figures['mesh']} of "
           f"{figures['device_kind']}):",
           f"  arguments       {format_bytes(mem['arguments'])}",
           f"  outputs         {format_bytes(mem['outputs'])}",
           f"  aliased         {format_bytes(-mem['alias'])}  (donated state reused as output)",
           f"  temporaries     {format_bytes(mem['temporaries'])}",
           f"  generated code  {format_bytes(mem['generated_code'])}",
           f"  total           {format_bytes(mem['total'])}" +
           (f"  (limit {format_bytes(limit).strip()})" if limit else ""),
           "analytic lower bound per device:"]
  lines += [f"  {format_bytes(b)}  {label}" for label, b in figures["bound"]]
  lines += [f"  {format_bytes(figures['bound_total'])}  total",
            f"compiled / bound: {mem['total'] / figures['bound_total']:.3f} (target <= 1.3)"]
  xla_total = figures["flops_xla"] * figures["devices"]
  lines += [f"FLOPs per step: formula (training/flops.py, no remat recompute) "
            f"{figures['flops_formula']:.4g}; XLA cost_analysis {figures['flops_xla']:.4g} per "
            f"device x {figures['devices']} = {xla_total:.4g} ({xla_total / figures['flops_formula']:.3f} "
            f"of the formula: XLA counts a loop's body once, not once per trip, and the step "
            f"loops over layers, MLP column sets, loss chunks and micro-batches)"]
  return "\n".join(lines)


def configured_batch_note(config, mesh_shape: dict, rows_per_shard: int,
                          accum: int) -> str | None:
  """A note when the run `config` describes has another micro-batch than the compiled one
  (`rows_per_shard` rows per batch shard, `accum` micro-batches), with the flags for it."""
  from infllava_jax import sharding
  global_batch, wanted_accum = config.train.get("global_batch_size"), config.train.grad_accum_steps
  shards = math.prod(mesh_shape[a] for a in sharding.batch_axes(sharding.rules_from_config(config)))
  if not global_batch or global_batch % (shards * wanted_accum):
    return None
  rows = global_batch // (shards * wanted_accum)
  if (rows, wanted_accum) == (rows_per_shard, accum):
    return None
  return (f"note: the config trains {rows} row(s) per batch shard per micro-batch x "
          f"{wanted_accum} micro-batches (train.global_batch_size {global_batch} over "
          f"{shards} batch shards); this compile measured {rows_per_shard} x {accum}. Add "
          f"--batch {rows} --grad-accum {wanted_accum} for the memory of that run.")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help=config_help("infllava_8b_stage2"))
  parser.add_argument("--inference", action="store_true",
                      help="compile the Assistant's generation on one device instead of the "
                           "train step: see `infllava compile --inference --help`")
  parser.add_argument("--mesh", default=None,
                      help="mesh to compile for, 'fsdp=8' or 'data=2,fsdp=2,tensor=2' (one "
                           "simulated CPU device per position); default: the config's mesh "
                           "on --devices devices")
  parser.add_argument("--topology", default=None,
                      help="compile for a TPU slice with the TPU compiler instead of "
                           "simulated CPU devices, e.g. v5e:2x4, v5p:2x2x2, v4:2x2x2 "
                           "(needs the libtpu package; no TPU); --mesh defaults to fsdp over "
                           "all its chips")
  parser.add_argument("--devices", type=int, default=8,
                      help="device count for a preset mesh name or a -1 axis (default 8)")
  parser.add_argument("--batch", type=int, default=1,
                      help="rows per batch shard (data x fsdp position) per micro-batch "
                           "(default 1)")
  parser.add_argument("--length", type=int, default=None,
                      help="tokens per row (default: the config's data.max_length)")
  parser.add_argument("--grad-accum", type=int, default=None,
                      help="micro-batches per step, replacing the config's "
                           "train.grad_accum_steps (default 1: memory of one micro-batch, no "
                           "accumulator; --config.train.grad_accum_steps=N works too)")
  parser.add_argument("--device-memory", type=parse_size, default=None,
                      help="fail (exit 1) when the compiled per-device total exceeds this, "
                           "e.g. 80GiB")
  args, overrides = parse_args_and_overrides(parser, argv,
                                             "--config.model.remat_policy=dots_saveable")
  accum_key = "--config.train.grad_accum_steps"
  accum_override = any(o.split("=")[0] == accum_key for o in overrides)
  if accum_override and args.grad_accum is not None:
    parser.error(f"--grad-accum and {accum_key} both set the micro-batch count; give one")
  if args.grad_accum is not None and args.grad_accum < 1:
    parser.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: open no TPU
    devices = topology_devices(args.topology)
    args.mesh = args.mesh or f"fsdp={len(devices)}"
    count = mesh_device_count(args.mesh, len(devices))
    if count > len(devices):
      parser.error(f"--mesh {args.mesh} needs {count} devices; {args.topology} has "
                   f"{len(devices)}")
    devices = devices[:count]
  else:
    count = mesh_device_count(args.mesh, args.devices) if args.mesh else args.devices
    request_cpu_devices(count)  # before anything imports jax (configs import it)
  config = load_config(args.config, overrides)
  missing = [key for key in ("train", "data", "model") if key not in config]
  if missing:
    parser.error(f"{args.config} has no {', '.join(missing)} section: compile takes a "
                 "training config (e.g. infllava_8b_stage2)")
  if args.mesh:
    config.mesh = args.mesh
  configured = config.copy_and_resolve_references()  # the run the config describes
  if not accum_override:
    config.train.grad_accum_steps = 1 if args.grad_accum is None else args.grad_accum
  if not args.topology:
    devices = available_devices(count)
  log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
  figures = compile_train_step(config, devices, args.batch,
                               args.length or config.data.max_length, log)
  print(report(figures, args.device_memory), flush=True)
  note = configured_batch_note(configured, figures["mesh"], args.batch,
                               config.train.grad_accum_steps)
  if note:
    print(note, flush=True)
  total = figures["memory"]["total"]
  if args.device_memory is not None and total > args.device_memory:
    print(f"infllava compile: per-device total {format_bytes(total).strip()} exceeds "
          f"--device-memory {format_bytes(args.device_memory).strip()}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
