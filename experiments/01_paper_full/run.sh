#!/usr/bin/env bash
# Experiment 1: the paper's experiments at full scale (GPU machine or cluster).
# Expected runtime: roughly 2-3 GPU-days in all (80 runs; a ResNet-18 FedAvg run
# needs ~240 rounds to spend 200 GiB, FSL-SAGE ~1,400), so run it on a cluster,
# where `raysage sweep` runs as many points side by side as the GPUs allow.
#   DATA_DIR=/data/cifar experiments/01_paper_full/run.sh            # one machine
#   ray job submit --working-dir . -- bash experiments/01_paper_full/run.sh
# DATA_DIR holds cifar-10-batches-py/ and cifar-100-python/ (the python
# versions from https://www.cs.toronto.edu/~kriz/cifar.html, fetched by you;
# raysage never downloads anything).
set -euo pipefail
: "${DATA_DIR:?set DATA_DIR to the folder holding cifar-10-batches-py/ and cifar-100-python/}"
OUT=${OUT:-runs/01_paper_full}
raysage sweep experiments/01_paper_full/sweep.yaml --data-dir "$DATA_DIR" --out "$OUT" "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/01_paper_full
