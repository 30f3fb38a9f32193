"""`infllava train`: train a model from a config (multi-host aware; resumes).

  infllava train --config synthetic[:arg] --workdir DIR [--config.a.b=value ...]
      [--init_base CONVERTED] [--init_from RUN]

One process per host (TPU VM worker, SLURM task or local process); `jax.distributed`
joins them, the mesh spans all devices, each host feeds its share of the global batch.
Progress lines every `train.log_every` steps; TensorBoard scalars in DIR/tensorboard;
checkpoints in DIR/checkpoints (resumed automatically). A new run starts from random
params, or from --init_base (all a checkpoint holds) and then --init_from (the
`train.init_include` params) on top; a line says which module came from where. A run
that finishes with `eval.heldout_examples` set (the synthetic configs) then prints its
held-out accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from infllava_jax.checkpoints import lock
from infllava_jax.config import config_help, load_config, parse_args_and_overrides
from infllava_jax.training import loop


def initialize_distributed(args) -> None:
  """Joins the processes of a multi-host run (explicit flags, or SLURM / TPU auto-detection)."""
  if args.num_processes and args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  elif args.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in (
      os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()


def log_heldout_accuracy(params, config) -> None:
  """The synthetic held-out accuracy of the trained `params`, as one progress line."""
  from infllava_jax.evaluate import synthetic  # only a run that evaluates loads inference
  accuracy = synthetic.heldout_accuracy(params, config)
  loop.log(f"held-out accuracy {accuracy['accuracy']:.3f} on {accuracy['examples']} examples "
           f"({config.model.variant})")


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="infllava train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help=config_help("synthetic:llava"))
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
  args, overrides = parse_args_and_overrides(parser, argv)
  initialize_distributed(args)
  config = load_config(args.config, overrides)
  with lock.WorkdirOwner(args.workdir):  # a second trainer on this workdir stops here
    trainer = loop.Trainer(config, args.workdir, init=loop.init_sources(
        args.init_base, args.init_from, config.train.get("init_include")))
    try:
      state = trainer.run()
    except loop.NonFiniteLossError as e:  # its message says it all: no traceback
      print(f"infllava train: error: {e}", file=sys.stderr)
      return 1
  if int(state.step) < trainer.total_steps:  # preempted: exit now, the next run resumes
    return 0
  if config.get("eval") and config.eval.get("heldout_examples"):
    log_heldout_accuracy(state.params, config)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
