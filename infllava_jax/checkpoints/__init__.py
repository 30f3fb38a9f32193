"""Checkpoints in both formats, read and written in one place.

  converted.py     a converted checkpoint: DIR/params (Orbax) + DIR/model_config.json
                   (+ DIR/tokenizer), what `infllava convert from-pytorch` writes
  run.py           a training run: WORKDIR/checkpoints/<step>/{params,opt_state,data,config}
  locate.py        which folder and step a path names; the newest step that reads
  params.py        params alone from either format (all, a subset, or lazily)
  init_sources.py  a new run's params from several checkpoints in order
  lock.py          one training run per workdir (an owner file with a heartbeat)
  preemption.py    saving and stopping on SIGTERM

Training, conversion, inference and evaluation import this package; it imports none of them.
"""
