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
# Ctrl-C or a SIGTERM to this script reaches every process (background jobs of a script
# ignore SIGINT), so each saves and exits as on a preemption. A process that fails stops the
# others, which would otherwise wait for it at their next collective until
# jax.distributed's timeout. The exit status is the first failure's, else 0.
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
status=0
while [ ${#pids[@]} -gt 0 ]; do
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}" && rc=0 || rc=$?
      unset "pids[$i]"
      if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        stop
      fi
    fi
  done
  sleep 1
done
exit $status
