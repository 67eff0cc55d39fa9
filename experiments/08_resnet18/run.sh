#!/usr/bin/env bash
# Experiment 8: FSL-SAGE and CSE-FSL with the paper's ResNet-18 at batch 256 on
# the CIFAR-10 subset, for the trend only.
# Expected runtime: about an hour on 2 CPU cores (2 runs of 40 rounds side by side).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/08_resnet18}
raysage sweep experiments/08_resnet18/sweep.yaml --data-dir "$DATA" --out "$OUT" \
    --parallel 2 --workers 1 --cpus-per-worker 1 "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/08_resnet18
