#!/usr/bin/env bash
# Experiment 6: split fine-tuning of GPT-2 on E2E-style data (issue 7).
#   experiments/06_gpt2_e2e/run.sh            scaled: about 12 minutes on 2 CPU cores
#   FULL=1 WEIGHTS=/models/gpt2-medium E2E=/data/e2e experiments/06_gpt2_e2e/run.sh
#                                             the paper's setup: GPU(s), about a GPU-day
# Nothing is downloaded: WEIGHTS holds model.safetensors, config.json, vocab.json
# and merges.txt; E2E holds trainset.csv and testset.csv.
set -euo pipefail
if [[ "${FULL:-0}" == 1 ]]; then
  : "${WEIGHTS:?set WEIGHTS to the GPT-2 medium folder}" "${E2E:?set E2E to the E2E CSV folder}"
  OUT=${OUT:-runs/06_gpt2_e2e_full}
  raysage sweep experiments/06_gpt2_e2e/full.yaml --weights-dir "$WEIGHTS" --data-dir "$E2E" \
    --out "$OUT" "$@"
  raysage report "$OUT" --metric test_loss --baseline fsl_sage --out docs/results/06_gpt2_e2e_full
else
  OUT=${OUT:-runs/06_gpt2_e2e}
  raysage sweep experiments/06_gpt2_e2e/scaled.yaml --out "$OUT" "$@"
  raysage report "$OUT" --metric test_loss --baseline fsl_sage --out docs/results/06_gpt2_e2e
fi
