#!/usr/bin/env bash
# Experiment 4: accuracy vs simulated time under the datacenter, wifi and
# 4g-mobile presets with log-normal stragglers, every algorithm.
# Expected runtime: about 25 minutes on 2 CPU cores (24 runs of 10 rounds).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/04_network}
raysage sweep experiments/04_network/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/04_network
