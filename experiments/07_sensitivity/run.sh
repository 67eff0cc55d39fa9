#!/usr/bin/env bash
# Experiment 7: FSL-SAGE vs CSE-FSL over batch size {20, 64, 128} and FSL-SAGE's
# alignment interval {1, 10}, with estimate quality between alignments.
# Expected runtime: about 50 minutes on 2 CPU cores (7 runs of 20 rounds).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/07_sensitivity}
raysage sweep experiments/07_sensitivity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" --out docs/results/07_sensitivity
