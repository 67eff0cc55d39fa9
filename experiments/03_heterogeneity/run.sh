#!/usr/bin/env bash
# Experiment 3: heterogeneity (best accuracy vs Dirichlet alpha), scaled.
# Expected runtime: about 35 minutes on 2 CPU cores (25 runs of 20 rounds).
# For the full-scale version use experiment 1, whose grid includes the same alphas.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/03_heterogeneity}
raysage sweep experiments/03_heterogeneity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" --out docs/results/03_heterogeneity
