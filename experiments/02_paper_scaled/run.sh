#!/usr/bin/env bash
# Experiment 2: the paper's comparison, scaled to this CPU machine.
# Expected runtime: about 45 minutes on 2 CPU cores (8 runs of 40 rounds, then
# two more seeds of FSL-SAGE and CSE-FSL).
# Run from the repository root; DATA may point at another CIFAR-10 .npz or
# a folder holding cifar-10-batches-py/ (then drop samples limits as you like).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/02_paper_scaled}
raysage sweep experiments/02_paper_scaled/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage sweep experiments/02_paper_scaled/seeds.yaml --data-dir "$DATA" --out "$OUT/seeds" "$@"
raysage report "$OUT" --out docs/results/02_paper_scaled
