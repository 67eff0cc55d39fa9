#!/usr/bin/env bash
# Experiment 4: accuracy vs simulated time under the datacenter, wifi and
# 4g-mobile presets with log-normal stragglers, every algorithm, at the
# reference code's CIFAR setting (simple_conv, batch 128).
# Expected runtime: about 2 hours on 2 CPU cores, two runs side by side
# (36 runs of 10 rounds, 5-7 minutes each).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/04_network}
raysage sweep experiments/04_network/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
# A client's straggler slowdown is drawn once per run from the seed, so runs
# compare in simulated time only at the same seed: all eight at seed 200, and
# FSL-SAGE against CSE-FSL over the three seeds.
same_devices=()
for run in "$OUT"/*/; do
    [[ $run == *__seed=* ]] || same_devices+=("$run")
done
raysage report "${same_devices[@]}" --baseline fsl_sage --out docs/results/04_network
raysage report "$OUT"/*algorithm=fsl_sage* "$OUT"/*algorithm=cse_fsl* --baseline fsl_sage \
    --out docs/results/04_network_seeds
