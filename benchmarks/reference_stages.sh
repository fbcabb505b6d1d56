# Shared by benchmarks/{ldm,dalle}_reference.sh (sourced, not run): the interpreter, the data
# and cache folders, and `stage`, which runs one `python -m jaxt2i` command and prints its time.
#
# PYTHON (default .venv/bin/python if present, else python3) picks the interpreter;
# JAXT2I_DATA_DIR / JAXT2I_CACHE_DIR default to .cache/data and .cache/jaxt2i, as for
# `make demo`.
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
