#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install this checkout on every worker,
# start `jaxt2i train` on all workers at once, stream the logs, stop, delete.
#
#   launch/tpu_vm.sh ACTION... [options] [-- jaxt2i train arguments]
#
# Actions (several run in order, e.g. `create setup train logs`):
#   create   create the TPU VM unless one of that name exists (then it is reused)
#   setup    build a wheel of this checkout, copy it and configs/ to every worker's home,
#            pip install it with jax[tpu] (and the libtpu wheels)
#   train    start `jaxt2i train ARGS` in ~ on every worker (--worker=all) in the background,
#            with --config.distributed.mode=cluster: JAX finds the other workers itself
#   logs     stream worker 0's log (Ctrl-C stops streaming, not training); --all_workers for
#            every worker's
#   stop     SIGTERM to training on every worker: it saves a checkpoint and exits (the way a
#            preemption notice is handled); `train` again resumes from it
#   delete   delete the TPU VM
#
# Options (environment variables of the same name in capitals give the defaults):
#   --name NAME              TPU VM name (jaxt2i)
#   --zone ZONE              e.g. us-central2-b (required unless gcloud has a default zone)
#   --project PROJECT        default: gcloud's
#   --accelerator TYPE       accelerator type, e.g. v4-32, v5litepod-16, v6e-64 (v4-8)
#   --version VERSION        TPU software (runtime) version (tpu-ubuntu2204-base)
#   --spot                   create a Spot VM (preemptible: relaunch `train`, it resumes)
#   --all_workers            `logs` shows every worker, not just worker 0
#   --dry-run                print the gcloud commands instead of running them
#
# The workdir should be on GCS (--workdir gs://bucket/run) so that every worker writes the
# same checkpoints and a new slice can resume the run. Mesh sizes are config fields, e.g. on
# a v4-32 (16 chips): --config.mesh.data=4 --config.mesh.fsdp=4 --config.sharding.strategy=fsdp
#
# Example:
#   launch/tpu_vm.sh create setup train logs --zone us-central2-b --accelerator v4-32 -- \
#       --config configs/ldm_shapes.py:reference --workdir gs://my-bucket/ldm \
#       --config.data.data_dir=gs://my-bucket/data
set -euo pipefail

name=${NAME:-jaxt2i}; zone=${ZONE:-}; project=${PROJECT:-}
accelerator=${ACCELERATOR:-v4-8}; version=${VERSION:-tpu-ubuntu2204-base}
spot=0; all_workers=0; dry=0
actions=(); train_args=()
repo=$(cd "$(dirname "$0")/.." && pwd)

usage() { sed -n '2,37p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    create|setup|train|logs|stop|delete) actions+=("$1"); shift ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --all_workers) all_workers=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "tpu_vm.sh: unknown action or option '$1' (jaxt2i train arguments go after --)" >&2
       exit 2 ;;
  esac
done
[ ${#actions[@]} -gt 0 ] || { usage >&2; echo "tpu_vm.sh: name at least one action" >&2; exit 2; }

flags=(--zone="$zone")
[ -n "$zone" ] || flags=()
[ -z "$project" ] || flags+=(--project="$project")
log=/tmp/jaxt2i-train.log

# Prints a command (shell-quoted) in dry-run mode, else runs it.
run() {
  if [ "$dry" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" --worker=all --command "$1"; }

for action in "${actions[@]}"; do
  case "$action" in
    create)
      if [ "$dry" = 0 ] && gcloud compute tpus tpu-vm describe "$name" "${flags[@]}" \
          >/dev/null 2>&1; then
        echo "tpu_vm.sh: reusing the existing TPU VM $name"
      else
        extra=()
        [ "$spot" = 0 ] || extra=(--spot)
        run gcloud compute tpus tpu-vm create "$name" "${flags[@]}" \
          --accelerator-type="$accelerator" --version="$version" "${extra[@]}"
      fi ;;
    setup)
      wheel_dir=/tmp/jaxt2i-wheel
      [ "$dry" = 1 ] || wheel_dir=$(mktemp -d)
      run python3 -m pip wheel --no-deps --quiet -w "$wheel_dir" "$repo"
      wheel="$wheel_dir/jaxt2i-*.whl"
      if [ "$dry" = 0 ]; then wheel=$(ls "$wheel_dir"/jaxt2i-*.whl); fi
      # The wheel, and configs/ (recipes are files, not package modules) into ~ on each worker.
      run gcloud compute tpus tpu-vm scp --recurse "$wheel" "$repo/configs" "$name": \
        "${flags[@]}" --worker=all
      ssh_all "python3 -m pip install --quiet \"\$(ls ~/jaxt2i-*.whl)[tpu]\" \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html" ;;
    train)
      [ ${#train_args[@]} -gt 0 ] || {
        echo "tpu_vm.sh: train needs jaxt2i train arguments after --" >&2; exit 2; }
      args=$(printf '%q ' "${train_args[@]}")
      ssh_all "nohup python3 -m jaxt2i train ${args}--config.distributed.mode=cluster \
> $log 2>&1 < /dev/null & echo started on \$(hostname)" ;;
    logs)
      if [ "$all_workers" = 1 ]; then
        ssh_all "tail -n 50 -F $log"
      else
        run gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" --worker=0 \
          --command "tail -n 50 -F $log"
      fi ;;
    stop)
      ssh_all "pkill -TERM -f 'jaxt2i train' || true" ;;
    delete)
      run gcloud compute tpus tpu-vm delete "$name" "${flags[@]}" --quiet ;;
  esac
done
