# Shared by benchmarks/{ldm,dalle}_reference.sh (sourced, not run): strict mode, the
# interpreter, the data and cache folders, `stage`, which runs one `python -m jaxt2i` command
# and prints its time, and `shapes_and_evaluator`, the first two stages of both recipes.
#
# PYTHON (default .venv/bin/python if present, else python3) picks the interpreter;
# JAXT2I_DATA_DIR / JAXT2I_CACHE_DIR default to .cache/data and .cache/jaxt2i, as for
# `make demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export JAXT2I_DATA_DIR=${JAXT2I_DATA_DIR:-$PWD/.cache/data}
export JAXT2I_CACHE_DIR=${JAXT2I_CACHE_DIR:-$PWD/.cache/jaxt2i}
export PYTHONUNBUFFERED=1

stage() {
  echo "=== $* ($(date +%T))"
  local start=$SECONDS
  "$PYTHON" -m jaxt2i "$@"
  echo "=== $(( SECONDS - start )) s"
}

# shapes-v1 at 64 px and its evaluator, each skipped when already built.
shapes_and_evaluator() {
  stage data build shapes --variant 64
  stage eval train-evaluator --image_size 64
}
