#!/usr/bin/env bash
# Experiment 7: FSL-SAGE vs CSE-FSL over batch size {20, 64, 128} and FSL-SAGE's
# alignment interval {1, 10}, with estimate quality between alignments.
# Expected runtime: about 50 minutes on 2 CPU cores (5 runs of 20 rounds; batch
# 128 is experiment 2's).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/07_sensitivity}
raysage sweep experiments/07_sensitivity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
# Batch 128 comes from experiment 2 (run it first).
BATCH128=${BATCH128:-runs/02_paper_scaled}
raysage report "$OUT" "$BATCH128/algorithm=fsl_sage" "$BATCH128/algorithm=cse_fsl" \
    --out docs/results/07_sensitivity
