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
# PYTHON picks the interpreter (benchmarks/reference_stages.sh); DVAE_ARGS, CLIP_ARGS and
# DALLE_ARGS add config overrides to a stage, e.g. DALLE_ARGS='--config.train.num_steps=1500'.
# shellcheck source=benchmarks/reference_stages.sh
source "$(dirname "$0")/reference_stages.sh"
WORKDIR=${1:-workdirs/reference}
shift || true

shapes_and_evaluator
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
