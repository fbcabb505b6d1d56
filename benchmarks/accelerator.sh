#!/usr/bin/env bash
# The accelerator benchmarks in one go, each recorded beside its CPU section in RESULTS.md as
# NAME_gpu (results/NAME_gpu.json):
#
#   bash benchmarks/accelerator.sh [--copy_to DIR]
#
# attention backends (cudnn / xla / einsum / torch SDPA, bfloat16), DALL-E transformer training
# MFU (paper and dense layer layouts), sparse vs dense-masked attention and KV-cache sampling,
# and the SD-1.5 U-Net against diffusers (train step, forward, 50-step guided DDIM loops with
# torch eager and torch.compile). Each runs under a time limit and a failure does not stop the
# others. --copy_to copies RESULTS.md and results/ to DIR after every benchmark.
# PYTHON (default python3) picks the interpreter.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
COPY_TO=""
if [[ "${1:-}" == "--copy_to" ]]; then COPY_TO=$2; fi
export PYTHONUNBUFFERED=1
# JAX takes 75% of GPU memory up front by default; the U-Net benchmark runs PyTorch beside it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}

run() {
  local limit=$1
  shift
  echo "=== $* (limit ${limit} s) $(date +%T)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$PYTHON" "$@" || echo "=== FAILED or out of time: $*"
  echo "=== $(( SECONDS - start )) s"
  if [[ -n "$COPY_TO" ]]; then
    mkdir -p "$COPY_TO"
    cp benchmarks/RESULTS.md "$COPY_TO"/
    tar -C benchmarks -czf "$COPY_TO"/results.tgz results
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
run 270 benchmarks/unet.py --preset sd15 --dtype bfloat16 --batch 8 --repeats 5 \
  --sampling_steps 50 --loop_repeats 2 --torch_compile
run 130 benchmarks/transformer.py
run 90 benchmarks/sparse_attention.py
run 50 benchmarks/attention.py --tokens 1024 4096 16384
