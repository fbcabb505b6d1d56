#!/usr/bin/env bash
# The DALL-E reference recipe end to end, then its numbers recorded in RESULTS.md:
#
#   bash benchmarks/dalle_reference.sh [WORKDIR] [dalle_reference.py flags...]
#
# builds shapes-v1 (64 px) and the shapes-v1 evaluator if they are missing, trains the dVAE,
# CLIP and the transformer with configs/{dvae,clip,dalle}_shapes.py:reference into
# WORKDIR/{dvae,clip,dalle} (default workdirs/reference), and runs
# benchmarks/dalle_reference.py on the three runs (sampled and CLIP-reranked scores, the dVAE's
# PSNR and code usage, CLIP's retrieval, each stage's time). Every stage resumes where it
# stopped, and a finished one returns at once: after an interruption, run it again.
#
# PYTHON (default .venv/bin/python if present, else python3) picks the interpreter;
# DVAE_ARGS, CLIP_ARGS and DALLE_ARGS add config overrides to a stage, e.g.
# DALLE_ARGS='--config.train.num_steps=1500'. JAXT2I_DATA_DIR / JAXT2I_CACHE_DIR default to
# .cache/data and .cache/jaxt2i, as for `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORKDIR=${1:-workdirs/reference}
shift || true
export JAXT2I_DATA_DIR=${JAXT2I_DATA_DIR:-$PWD/.cache/data}
export JAXT2I_CACHE_DIR=${JAXT2I_CACHE_DIR:-$PWD/.cache/jaxt2i}
export PYTHONUNBUFFERED=1

stage() {
  echo "=== $* ($(date +%T))"
  local start=$SECONDS
  "$PYTHON" -m jaxt2i "$@"
  echo "=== $(( SECONDS - start )) s"
}

stage data build shapes --variant 64
stage eval train-evaluator --image_size 64
# shellcheck disable=SC2086  # the *_ARGS are word lists
stage train --config configs/dvae_shapes.py:reference --workdir "$WORKDIR/dvae" ${DVAE_ARGS:-}
# shellcheck disable=SC2086
stage train --config configs/clip_shapes.py:reference --workdir "$WORKDIR/clip" ${CLIP_ARGS:-}
# shellcheck disable=SC2086
stage train --config configs/dalle_shapes.py:reference --workdir "$WORKDIR/dalle" \
  --config.model.dvae_workdir="$WORKDIR/dvae" ${DALLE_ARGS:-}
echo "=== recording ($(date +%T))"
"$PYTHON" benchmarks/dalle_reference.py --dvae "$WORKDIR/dvae" --clip "$WORKDIR/clip" \
  --dalle "$WORKDIR/dalle" "$@"
