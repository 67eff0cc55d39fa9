#!/usr/bin/env bash
# Experiment 7: FSL-SAGE vs CSE-FSL over batch size {20, 64, 128}, FSL-SAGE's
# alignment interval {1, 5, 10}, and at batch 20 the server stepping on every
# batch (q = 1) and the client learning rate scaled with the batch, with
# estimate quality between alignments.
# Expected runtime: about 1.5 hours on 2 CPU cores (14 runs of 20 rounds,
# 5-9 minutes each; batch 128 at l = 10 is experiment 2's).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/07_sensitivity}
raysage sweep experiments/07_sensitivity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
# Batch 128 comes from experiment 2 (run it first).
BATCH128=${BATCH128:-runs/02_paper_scaled}
# One panel per batch size, the variants of each as lines.
raysage report "$OUT" "$BATCH128/algorithm=fsl_sage" "$BATCH128/algorithm=cse_fsl" \
    --lines align_interval --lines server_update_interval --lines client_lr \
    --baseline fsl_sage --out docs/results/07_sensitivity
