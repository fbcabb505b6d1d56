#!/usr/bin/env bash
# The latent-diffusion reference recipe end to end, then its numbers recorded in RESULTS.md:
#
#   bash benchmarks/ldm_reference.sh [WORKDIR] [ldm_reference.py flags, e.g. --unguided]
#
# builds shapes-v1 (64 px) and the shapes-v1 evaluator if they are missing, trains the
# autoencoder and the LDM with configs/{autoencoder,ldm}_shapes.py:reference into
# WORKDIR/{autoencoder,ldm} (default workdirs/reference), and runs benchmarks/ldm_reference.py
# on the two runs (the autoencoder's PSNR and the score of its reconstructions, the LDM's
# shapes-v1 score on `test` and `test_heldout` prompts, each stage's time). Every stage resumes
# where it stopped, and a finished one returns at once: after an interruption, run it again.
#
# PYTHON picks the interpreter (benchmarks/reference_stages.sh); AE_ARGS and LDM_ARGS add
# config overrides to a stage, e.g. LDM_ARGS='--config.train.num_steps=8000'.
# shellcheck source=benchmarks/reference_stages.sh
source "$(dirname "$0")/reference_stages.sh"
WORKDIR=${1:-workdirs/reference}
shift || true

shapes_and_evaluator
# shellcheck disable=SC2086  # the *_ARGS are word lists
stage train --config configs/autoencoder_shapes.py:reference --workdir "$WORKDIR/autoencoder" \
  ${AE_ARGS:-}
# shellcheck disable=SC2086
stage train --config configs/ldm_shapes.py:reference --workdir "$WORKDIR/ldm" \
  --config.model.autoencoder_workdir="$WORKDIR/autoencoder" ${LDM_ARGS:-}
echo "=== recording ($(date +%T))"
"$PYTHON" benchmarks/ldm_reference.py --autoencoder "$WORKDIR/autoencoder" \
  --ldm "$WORKDIR/ldm" "$@"
