"""`infllava train`: the training loop around the jitted step.

  infllava train --config configs/synthetic.py[:arg] --workdir DIR [--config.a.b=value ...]
      [--init_base CONVERTED] [--init_from RUN]

One process per host (TPU VM worker, SLURM task or local process); `jax.distributed`
joins them, the mesh spans all devices, each host feeds its share of the global batch.
Progress lines every `train.log_every` steps; TensorBoard scalars in DIR/tensorboard;
checkpoints in DIR/checkpoints (resumed automatically). A new run starts from random
params, or from --init_base (all a checkpoint holds) and then --init_from (the
`train.init_include` params) on top; a line says which module came from where.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from infllava_jax import sharding, xla_options
from infllava_jax.checkpoints import init_sources as init_lib
from infllava_jax.checkpoints import locate, lock, params as checkpoint_params, preemption
from infllava_jax.checkpoints import run as checkpoint
from infllava_jax.config import load_config
from infllava_jax.data import pipeline, sources
from infllava_jax.model import infllava
from infllava_jax.training import flops, optim
from infllava_jax.training.step import BATCH_KEYS, TrainState, make_train_step


class NonFiniteLossError(RuntimeError):
  pass


def initialize_distributed(args) -> None:
  """Joins the processes of a multi-host run (explicit flags, or SLURM / TPU auto-detection)."""
  if args.num_processes and args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in (
      os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()


def total_steps(config: ConfigDict, source_len: int, global_batch: int) -> int:
  """train.steps, or else num_epochs passes over the data: whole batches, except that the
  modality-grouped order pads each epoch to whole batches (a last, partly empty one)."""
  if config.train.get("steps"):
    return int(config.train.steps)
  if config.data.get("group_by_modality"):
    return max(1, config.train.num_epochs * -(-source_len // global_batch))
  return max(1, config.train.num_epochs * source_len // global_batch)


def global_batch_from_host(batch: dict, mesh) -> dict:
  """Per-host numpy batch -> global jax.Arrays split over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, batch[k].ndim),
                                                    batch[k]) for k in BATCH_KEYS}


def on_mesh(tree: Any, mesh) -> Any:
  """`tree` with every leaf not already laid out on `mesh` replicated over it.

  The jitted step's in_shardings come from the state's leaves: one left on a single
  device (a fresh `jnp.zeros` scalar) would clash with the mesh the step runs on.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(x):
    if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, tree)


def check_divisible(global_batch: int, mesh, accum: int) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % (shards * accum):
    raise ValueError(
        f"global batch {global_batch} (data.batch_size {global_batch // jax.process_count()} x "
        f"{jax.process_count()} processes) must divide into train.grad_accum_steps={accum} "
        f"micro-batches over data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} "
        f"= {shards} batch shards")


def init_sources(init_base: str | None, init_from: str | None,
                 init_include: Sequence[str] | None) -> list[init_lib.InitSource]:
  """The command line's sources, in the order they apply: `--init_base` (every param it
  holds, e.g. a converted LLaMA-3 + CLIP), then `--init_from` (the `train.init_include`
  params, e.g. a stage-1 run's DEM + projector, or all it holds when that is None)."""
  out = []
  if init_base:
    out.append(init_lib.InitSource(init_base))
  if init_from:
    out.append(init_lib.InitSource(init_from,
                                   None if init_include is None else tuple(init_include)))
  return out


def initial_params(init_fn, init_args: tuple, target: Any, mesh,
                   init: Sequence[init_lib.InitSource]) -> Any:
  """A new run's params: each read from the last `init` source that gives it, the rest
  from `init_fn(*init_args)`, all laid out as `target` (ShapeDtypeStructs with shardings).

  The sources are checked (metadata only) before anything is computed or read, and the
  random init computes only the params no source gives (XLA drops the rest): an 8B run
  from a converted checkpoint never builds, nor compiles, a random LLM it would discard.
  """
  plans = init_lib.plan_init(target, init)
  flat = traverse_util.flatten_dict(target, sep="/")
  given = {k for plan in plans for k in plan.paths}
  fresh = [k for k in flat if k not in given]
  if init:
    log(init_lib.describe_init(plans, list(flat)))
  out = init_lib.read_init(plans, target)
  if fresh:
    def init_fresh(*args):
      params = traverse_util.flatten_dict(nn.meta.unbox(init_fn(*args))["params"], sep="/")
      return {k: params[k] for k in fresh}

    with jax.set_mesh(mesh), sharding.axis_rules():
      out.update(jax.jit(init_fresh, out_shardings={k: flat[k].sharding for k in fresh})(
          *init_args))
  return traverse_util.unflatten_dict({k: out[k] for k in flat}, sep="/")


def zeros_like_sharded(target: Any) -> Any:
  """Zeros shaped, typed and sharded as `target`'s ShapeDtypeStructs (placeholders)."""
  shardings = jax.tree.map(lambda x: x.sharding, target)
  return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), target),
                 out_shardings=shardings)()


class Trainer:
  """Everything a run holds: mesh, model, optimiser, compiled step, data, checkpoints."""

  def __init__(self, config: ConfigDict, workdir: str, *,
               init: Sequence[init_lib.InitSource] = (),
               devices: Sequence[jax.Device] | None = None):
    """init: where a new run's params come from (`init_sources`), applied in order; params
    no source gives keep their random init (train.seed). Ignored when `workdir` already
    has checkpoints: the run resumes from them.
    devices: what `config.mesh` spans (default: all of them, every process's)."""
    if isinstance(init, (str, os.PathLike)):
      raise TypeError("Trainer(init=...) takes a list of init_sources.InitSource, not a path")
    config = config.copy_and_resolve_references()
    with config.unlocked():  # the pipeline reads the rows per process from here
      config.data.batch_size = pipeline.host_batch_size(config, jax.process_count())
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.model = infllava.build_model(config.model)
    self.n_img = infllava.num_image_tokens(config.model)
    train = config.train
    self.source = sources.make_source(config.data, "train")
    self.global_batch = config.data.batch_size * jax.process_count()
    check_divisible(self.global_batch, self.mesh, train.grad_accum_steps)
    self.total_steps = total_steps(config, len(self.source), self.global_batch)
    checkpoint.check_config(config.checkpoint)
    checkpoints = os.path.join(workdir, locate.RUN_CHECKPOINTS)
    resuming = bool(locate.complete_steps(checkpoints))

    init_args = (jax.random.key(train.seed), *infllava.dummy_inputs(config.model))
    abstract = jax.eval_shape(self.model.init, *init_args)
    self.param_shardings = sharding.param_shardings(abstract, self.mesh)["params"]
    target = checkpoint_params.abstract_tree(nn.meta.unbox(abstract["params"]),
                                             self.param_shardings)
    if resuming:
      if init:
        log(f"{workdir} has checkpoints: resuming it, --init_* ignored "
            f"({', '.join(os.fspath(s.path) for s in init)})")
      params = zeros_like_sharded(target)  # overwritten by the restore below
    else:
      params = initial_params(self.model.init, init_args, target, self.mesh, init)
    # Created once the init sources have been read: a start that fails on one of them
    # leaves no checkpoint folder behind.
    self.checkpointer = checkpoint.Checkpointer(checkpoints, config.checkpoint, config=config)
    self.mask = optim.trainable_mask(params, train)
    self.schedule = optim.learning_rate_schedule(train, self.total_steps)
    self.tx = optim.make_optimizer(train, self.total_steps, params)
    # Eager init: each moment is created with its param's sharding (under jit, GSPMD
    # would replicate them); the scalar counts land on one device and are then replicated.
    opt_state = on_mesh(self.tx.init(params), self.mesh)
    self.state = TrainState(on_mesh(jnp.zeros((), jnp.int32), self.mesh), params, opt_state)
    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    batch_shardings = {k: sharding.batch_sharding(self.mesh, 5 if k == "pixels" else 2)
                       for k in BATCH_KEYS}
    self._compiled_step = jax.jit(
        make_train_step(self.model, self.tx, train, self.mask, self.schedule),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None), donate_argnums=0,
        compiler_options=xla_options.compiler_options(self.mesh.devices.flat[0].platform))
    self.data = pipeline.make_iterator(config, self.source, "train",
                                       num_epochs=None)
    self.start_step = 0
    if resuming:
      abstract_opt = checkpoint_params.abstract_tree(
          self.state.opt_state, jax.tree.map(lambda x: x.sharding, self.state.opt_state))
      restored = self.checkpointer.restore_newest(target, abstract_opt,
                                                  self.data.grain_iterator)
      self.state = TrainState(on_mesh(jnp.asarray(restored.step, jnp.int32), self.mesh),
                              restored.params, restored.opt_state)
      self.start_step = restored.step
      log(f"resumed from step {restored.step} in {self.checkpointer.directory}")

  def step_fn(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # The mesh and logical rules must be in scope when the step is traced.
    with jax.set_mesh(self.mesh), sharding.axis_rules():
      return self._compiled_step(state, batch)

  def step_flops(self) -> float:
    cfg = self.config
    images = self.global_batch * cfg.data.max_images_per_row
    trainable = [p for p, m in zip(jax.tree.leaves(optim.param_paths(self.state.params)),
                                   jax.tree.leaves(self.mask)) if m]
    return flops.train_step_flops(cfg.model, self.global_batch, cfg.data.max_length, images,
                                  self.n_img, trainable)

  def run(self, until_step: int | None = None,
          on_metrics: Callable[[int, dict[str, float]], None] | None = None) -> TrainState:
    """Trains from the current step to `total_steps`, or stops after `until_step` as a
    preemption would (saving it): the schedule still spans `total_steps`.

    on_metrics(step, {"loss", "lr", "grad_norm", "tokens"}) is called for every step, in
    order, once per progress line (when the metrics are fetched anyway), e.g. to plot the
    loss in a notebook; it runs on process 0 only, as the TensorBoard scalars do.
    """
    cfg = self.config.train
    last_step_to_run = self.total_steps if until_step is None else min(until_step,
                                                                       self.total_steps)
    peak = (cfg.get("peak_flops_per_device")
            or flops.PEAK_FLOPS.get(self.mesh.devices.flat[0].device_kind))
    step_flops = self.step_flops()
    # At the end, in reverse order, each even if one before it raises (a failed write).
    with contextlib.ExitStack() as cleanup:
      writer = metric_writer(self.workdir)
      cleanup.callback(writer.close)
      preempted = preemption.PreemptionFlag()
      cleanup.callback(preempted.restore)
      cleanup.callback(self.checkpointer.wait_until_finished)
      sizes = [x.size for x in jax.tree.leaves(self.state.params)]
      trainable = sum(n for n, m in zip(sizes, jax.tree.leaves(self.mask)) if m)
      log(f"training {self.total_steps} steps, global batch {self.global_batch}, mesh "
          f"{dict(self.mesh.shape)}, {self.mesh.size} devices, {sum(sizes):,} params "
          f"({trainable:,} trainable)")
      pending: list[tuple[int, dict]] = []
      step = int(self.state.step)  # a second run() goes on where the first stopped
      first_step, last_step, last_time = step + 1, step, time.perf_counter()
      while step < last_step_to_run:
        batch = global_batch_from_host(next(self.data), self.mesh)
        self.state, metrics = self.step_fn(self.state, batch)
        step += 1
        pending.append((step, metrics))
        if step == first_step:  # timed apart from the progress lines' speeds
          jax.block_until_ready(metrics)
          now = time.perf_counter()
          log(f"step {step} took {now - last_time:.1f}s (the step compiles on its first call)")
          last_step, last_time = step, now
        stop = preempted.should_stop(step)
        if step % cfg.log_every == 0 or step == last_step_to_run or stop or \
            self.checkpointer.should_save(step):
          host = check_finite(pending)  # one host sync per interval, not per step
          now = time.perf_counter()
          last = host[-1][1]
          speed = ""
          if step > last_step:
            rate = (step - last_step) / (now - last_time)
            tokens_per_s = rate * self.global_batch * self.config.data.max_length
            mfu = (f"{100 * rate * step_flops / (peak * self.mesh.size):.1f}%"
                   if peak else "n/a")
            speed = f" tokens/s {tokens_per_s:,.0f} step_time {1 / rate:.3f}s MFU {mfu}"
            writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
          log(f"step {step}/{self.total_steps} loss {last['loss']:.4f} lr {last['lr']:.2e} "
              f"grad_norm {last['grad_norm']:.3f}{speed} samples "
              f"{self.data.counts['samples']} skipped {self.data.counts['bad_skipped']}")
          for s, m in host:
            for name, value in m.items():
              writer.add_scalar(f"train/{name}", value, s)
            if on_metrics and jax.process_index() == 0:
              on_metrics(s, m)
          pending, last_time, last_step = [], now, step
          self.checkpointer.save(step, self.state.params, self.state.opt_state,
                                 self.data.grain_iterator, force=stop)
        if stop:
          log(f"preempted ({preempted_by(preempted)}): saved step {step}, exiting")
          break
      else:
        self.checkpointer.save(step, self.state.params, self.state.opt_state,
                               self.data.grain_iterator, force=True)
    return self.state


def check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches the metrics of the last steps; stops the run at the first non-finite one.

  The grad norm is checked too: step s's loss is computed before its update, so a NaN
  gradient would otherwise reach the params saved at step s with a finite loss beside it.
  """
  host = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
  for s, m in host:
    for name in ("loss", "grad_norm"):
      if not math.isfinite(m[name]):
        raise NonFiniteLossError(
            f"{name} is {m[name]} at step {s}; stopping without saving it. The last good "
            "checkpoint is kept: lower train.lr, check the data, or set train.max_grad_norm")
  return host


def preempted_by(flag: preemption.PreemptionFlag) -> str:
  return signal.Signals(flag.signal).name if flag.signal else "JAX's preemption notice"


def metric_writer(workdir: str):
  from tensorboardX import SummaryWriter
  if jax.process_index() != 0:
    return _NullWriter()
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


class _NullWriter:
  def add_scalar(self, *args):
    pass

  def close(self):
    pass


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="config file[:arg], e.g. configs/synthetic.py:llava")
  parser.add_argument("--workdir", required=True,
                      help="run folder: checkpoints, TensorBoard logs (resumes if present)")
  parser.add_argument("--init_base", "--init-base", default=None, metavar="PATH",
                      help="params to start from: every param of the model that PATH holds "
                           "(a converted checkpoint, e.g. LLaMA-3 + CLIP from `infllava "
                           "convert from-pytorch`, or a run folder)")
  parser.add_argument("--init_from", "--init-from", default=None, metavar="PATH",
                      help="params applied after --init_base: those train.init_include "
                           "selects (e.g. a stage-1 run's DEM + projector; None: all PATH "
                           "holds). Params no source gives keep their random init. Both are "
                           "ignored when WORKDIR has checkpoints (the run resumes)")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-process run whose coordinator and process id "
                           "jax.distributed finds itself (Cloud TPU VM metadata: "
                           "launch/tpu_pod.sh passes it). SLURM jobs of several tasks and "
                           "GKE TPU slices are joined without it")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0 for a multi-process run")
  parser.add_argument("--num-processes", type=int, default=None,
                      help="processes in a multi-process run (with --coordinator)")
  parser.add_argument("--process-id", type=int, default=None,
                      help="this process's index, 0 .. num-processes - 1 (0 is the "
                           "coordinator)")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like "
                 "--config.train.lr=1e-4)")
  initialize_distributed(args)
  config = load_config(args.config, overrides)
  with lock.WorkdirOwner(args.workdir):  # a second trainer on this workdir stops here
    trainer = Trainer(config, args.workdir, init=init_sources(
        args.init_base, args.init_from, config.train.get("init_include")))
    try:
      state = trainer.run()
    except NonFiniteLossError as e:  # its message says it all: no traceback
      print(f"infllava train: error: {e}", file=sys.stderr)
      return 1
  if int(state.step) < trainer.total_steps:  # preempted: exit now, the next run resumes
    return 0
  if config.get("eval") and config.eval.get("heldout_examples"):
    from infllava_jax.evaluate import synthetic
    accuracy = synthetic.heldout_accuracy(trainer.state.params, config)
    log(f"held-out accuracy {accuracy['accuracy']:.3f} on {accuracy['examples']} examples "
        f"({config.model.variant})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
