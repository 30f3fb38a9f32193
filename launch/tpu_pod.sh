#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every worker at once.
# `infllava train --distributed`: jax.distributed.initialize() finds the coordinator and
# process ids from the TPU VM metadata.
#
#   launch/tpu_pod.sh NAME ZONE configs/infllava_8b_stage1.py gs://bucket/run1 [options...]
#
# The run lasts as long as this ssh session unless LOG is set: LOG=train.log detaches it on
# every worker (nohup, output to that file under $REPO_DIR), so a dropped connection or a
# closed laptop does not stop it; follow it with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command "tail -f ~/infllava-jax/train.log"
#
# The repository must already be cloned and installed at $REPO_DIR (default ~/infllava-jax)
# on every worker, e.g. with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "git clone URL ~/infllava-jax && pip install -e ~/infllava-jax'[tpu]'"
# (the tpu extra brings libtpu, without which jax sees no TPU and trains on the CPU).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [infllava train options...]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_DIR:-'~/infllava-jax'}
# A multi-host slice must run on all workers together: a single worker would wait forever
# for its peers at jax.distributed.initialize(). Refuse anything but --worker=all.
if [ -n "${WORKER:-}" ] && [ "${WORKER}" != "all" ]; then
  echo "$0: refusing WORKER=$WORKER: every worker of the slice must start together (--worker=all)" >&2
  exit 2
fi
# Each argument quoted for the remote shell (paths with spaces, no empty '' argument when
# there are no options). --distributed: every worker joins the others (jax.distributed finds
# the coordinator and its process id from the TPU VM metadata).
args=$(printf ' %q' --config "$config" --workdir "$workdir" --distributed "$@")
run="infllava train$args"
if [ -n "${LOG:-}" ]; then
  run="nohup $run > $(printf '%q' "$LOG") 2>&1 < /dev/null &"
fi
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd $repo && $run"
