#!/usr/bin/env bash
# N processes x M fake CPU devices on localhost: the same code path as a TPU pod or a
# multi-node GPU job (jax.distributed + gloo collectives), for development.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [--dry-run] \
#       -- --config configs/baseline_shapes.py:tiny --workdir /tmp/run [--config.FIELD=VALUE ...]
#
# Logs go to ${LOG_DIR:-/tmp/jaxt2i-local}/process_<i>.log; if any process fails, the others
# are stopped and the script exits with its status.
set -euo pipefail
n=2; d=2; port=""; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) d="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (put jaxt2i train arguments after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "missing jaxt2i train arguments after --" >&2; exit 2; }
port=${port:-$(( 20000 + RANDOM % 20000 ))}
log_dir=${LOG_DIR:-/tmp/jaxt2i-local}
jaxt2i=${JAXT2I:-jaxt2i}
cmds=()
for ((i = 0; i < n; i++)); do
  cmds+=("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$d $jaxt2i train $* \
--config.distributed.mode=explicit --config.distributed.coordinator_address=localhost:$port \
--config.distributed.num_processes=$n --config.distributed.process_id=$i")
done
if [ "$dry" = 1 ]; then
  for c in "${cmds[@]}"; do echo "$c"; done
  exit 0
fi
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  bash -c "${cmds[$i]}" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for ((i = 0; i < n; i++)); do
  if ! wait "${pids[$i]}"; then
    status=$?
    echo "process $i failed (status $status); see $log_dir/process_$i.log" >&2
    kill "${pids[@]}" 2>/dev/null || true
    break
  fi
done
tail -n 3 "$log_dir/process_0.log"
exit $status
