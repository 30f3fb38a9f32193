"""The training loop around the jitted step: `Trainer` (the `infllava train` command is
`training/cli.py`).

One process per host (TPU VM worker, SLURM task or local process), the mesh spans all
devices, each host feeds its share of the global batch. Progress lines every
`train.log_every` steps; TensorBoard scalars in WORKDIR/tensorboard; checkpoints in
WORKDIR/checkpoints (resumed automatically). A new run starts from random params, or from
init sources (`init_sources`); a line says which module came from where.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from ml_collections import ConfigDict

from infllava_jax import sharding
from infllava_jax.checkpoints import init_sources as init_lib
from infllava_jax.checkpoints import locate, preemption
from infllava_jax.checkpoints import run as checkpoint
from infllava_jax.data import pipeline, sources
from infllava_jax.model import infllava
from infllava_jax.training import flops, optim
from infllava_jax.training import state as state_lib
from infllava_jax.training.step import TrainState


class NonFiniteLossError(RuntimeError):
  pass


def total_steps(config: ConfigDict, source_len: int, global_batch: int) -> int:
  """train.steps, or else num_epochs passes over the data: whole batches, except that the
  modality-grouped order pads each epoch to whole batches (a last, partly empty one)."""
  if config.train.get("steps"):
    return int(config.train.steps)
  if config.data.get("group_by_modality"):
    return max(1, config.train.num_epochs * -(-source_len // global_batch))
  return max(1, config.train.num_epochs * source_len // global_batch)


def global_batch_from_host(batch: dict, mesh,
                           rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES) -> dict:
  """Per-host numpy batch -> global jax.Arrays split as the rules place `batch` (by default
  over (data, fsdp))."""
  def place(x):
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim, rules), x)

  return {k: jax.tree.map(place, batch[k]) for k in pipeline.BATCH_KEYS}


def batch_shards(mesh, rules: Sequence[tuple[str, Any]]) -> int:
  """How many pieces the rules split the batch's rows into on `mesh`."""
  return math.prod(mesh.shape[a] for a in sharding.batch_axes(rules))


def check_divisible(global_batch: int, mesh, accum: int,
                    rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES) -> None:
  shards = batch_shards(mesh, rules)
  if global_batch % (shards * accum):
    axes = sharding.batch_axes(rules)
    sizes = " x ".join(str(mesh.shape[a]) for a in axes)
    split = f"{' x '.join(axes)} = {sizes} = " if axes else ""
    raise ValueError(
        f"global batch {global_batch} (data.batch_size {global_batch // jax.process_count()} x "
        f"{jax.process_count()} processes) must divide into train.grad_accum_steps={accum} "
        f"micro-batches over {split}{shards} batch shards")


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
                   init: Sequence[init_lib.InitSource],
                   rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES) -> Any:
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

    with jax.set_mesh(mesh), sharding.axis_rules(rules):
      out.update(jax.jit(init_fresh, out_shardings={k: flat[k].sharding for k in fresh})(
          *init_args))
  return traverse_util.unflatten_dict({k: out[k] for k in flat}, sep="/")


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
    train = config.train
    self.source = sources.make_source(config.data, "train")
    self.global_batch = config.data.batch_size * jax.process_count()
    rules = sharding.rules_from_config(config)
    check_divisible(self.global_batch, self.mesh, train.grad_accum_steps, rules)
    self.total_steps = total_steps(config, len(self.source), self.global_batch)
    checkpoint.check_config(config.checkpoint)
    checkpoints = os.path.join(workdir, locate.RUN_CHECKPOINTS)
    resuming = bool(locate.complete_steps(checkpoints))

    # Shapes and shardings only: the fresh init and the restore below each create the
    # state once, in place (`training/state.py`).
    self.setup = state_lib.train_setup(config, self.mesh, self.total_steps)
    self.model, self.mask = self.setup.model, self.setup.mask
    self.tx, self.schedule = self.setup.tx, self.setup.schedule
    self.n_img = infllava.projected_tokens(config.model)
    abstract = self.setup.abstract
    if resuming:
      if init:
        log(f"{workdir} has checkpoints: resuming it, --init_* ignored "
            f"({', '.join(os.fspath(s.path) for s in init)})")
    else:
      params = initial_params(self.setup.init_model.init, self.setup.init_args,
                              self.setup.init_target, self.mesh, init, rules)
      params = state_lib.prepare_params(self.setup, train, params)
      self.state = state_lib.init_state(self.setup, params)
    # Created once the init sources have been read: a start that fails on one of them
    # leaves no checkpoint folder behind.
    self.checkpointer = checkpoint.Checkpointer(checkpoints, config.checkpoint, config=config)
    self._compiled_step = state_lib.jit_train_step(self.setup, train)
    self.data = pipeline.make_iterator(config, self.source, "train",
                                       num_epochs=None)
    self.start_step = 0
    if resuming:
      restored = self.checkpointer.restore_newest(abstract.params, abstract.opt_state,
                                                  self.data.grain_iterator)
      step = jax.make_array_from_callback((), abstract.step.sharding,
                                          lambda _: np.int32(restored.step))  # multi-host safe
      self.state = TrainState(step, restored.params, restored.opt_state)
      self.start_step = restored.step
      log(f"resumed from step {restored.step} in {self.checkpointer.directory}")

  def step_fn(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # The mesh must be in scope when the step is traced (the step applies the rules).
    with jax.set_mesh(self.mesh):
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
        batch = global_batch_from_host(next(self.data), self.mesh, self.setup.rules)
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
