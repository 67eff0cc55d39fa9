#!/usr/bin/env bash
# Experiment 3: heterogeneity (Dirichlet alpha 0.1 and 1, and experiment 2's
# iid runs) at the reference code's CIFAR setting: FSL-SAGE, CSE-FSL,
# SplitFed v2 and FedAvg, three seeds each.
# Expected runtime: about 2 hours on 2 CPU cores, two runs side by side
# (24 runs of 20 rounds, 8-12 minutes each; 1 h 55 min measured).
# For the full-scale version use experiment 1, whose grid includes more alphas.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/03_heterogeneity}
IID=${IID:-runs/02_paper_scaled}
raysage sweep experiments/03_heterogeneity/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
# Experiment 2's iid runs of the same four algorithms, over the same 20 rounds
# (its runs may be longer: a run's first rounds do not depend on how many follow).
shopt -s nullglob
iid=()
for a in fsl_sage cse_fsl splitfed_v2 fedavg; do
    for run in "$IID"/algorithm=$a "$IID"/algorithm=${a}__*; do
        [ -d "$run" ] && iid+=("$run")
    done
done
if [ ${#iid[@]} -eq 0 ]; then
    echo "no iid runs in $IID (run experiments/02_paper_scaled/run.sh first): reporting the skewed runs alone" >&2
fi
raysage report "$OUT" ${iid[@]+"${iid[@]}"} --rounds 20 --baseline fsl_sage --out docs/results/03_heterogeneity
