#!/usr/bin/env bash
# Train on this machine: one process over all local devices, or N processes on 127.0.0.1
# (a multi-host rehearsal on one box: each process sees its own share of CPU devices).
#
#   launch/local.sh configs/synthetic.py /tmp/run                 # one process
#   NUM_PROCESSES=2 launch/local.sh configs/synthetic.py /tmp/run # two processes, loopback
#
# Extra arguments go to `infllava train` (e.g. --config.train.steps=100).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [infllava train options...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
num=${NUM_PROCESSES:-1}
if [ "$num" -eq 1 ]; then
  exec infllava train --config "$config" --workdir "$workdir" "$@"
fi
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 10000))}
pids=()
for ((i = 0; i < num; i++)); do
  infllava train --config "$config" --workdir "$workdir" \
    --coordinator "127.0.0.1:$port" --num-processes "$num" --process-id "$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
