#!/usr/bin/env bash
# Experiment 2: the paper's comparison at the reference code's CIFAR setting
# (simple_conv, batch 128), scaled to this CPU machine.
# Expected runtime: about 2 hours on 2 CPU cores (12 runs of 10 or 20 rounds).
# Run from the repository root; DATA may point at another CIFAR-10 .npz or
# a folder holding cifar-10-batches-py/.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/02_paper_scaled}
raysage sweep experiments/02_paper_scaled/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/02_paper_scaled
