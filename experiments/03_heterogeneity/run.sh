#!/usr/bin/env bash
# Experiment 3: heterogeneity (Dirichlet alpha 0.1 and 1, and experiment 2's
# iid runs) at the reference code's CIFAR setting.
# Expected runtime: about 25 minutes on 2 CPU cores (4 runs of 20 rounds).
# For the full-scale version use experiment 1, whose grid includes more alphas.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/03_heterogeneity}
IID=${IID:-runs/02_paper_scaled}
raysage sweep experiments/03_heterogeneity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" "$IID" --baseline fsl_sage --out docs/results/03_heterogeneity
