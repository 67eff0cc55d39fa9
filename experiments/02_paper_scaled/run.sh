#!/usr/bin/env bash
# Experiment 2: the paper's comparison at the reference code's CIFAR setting
# (simple_conv, batch 128), scaled to this CPU machine.
# Expected runtime: about 2 hours on 2 CPU cores (12 runs of 10 or 20 rounds).
# LENGTH=40: the reference's 40 rounds, every algorithm at three seeds and at
# its tuned rates (reference.yaml): about 7 hours, one of them tuning (not yet
# run through on this machine; see docs/results.md).
# Run from the repository root; DATA may point at another CIFAR-10 .npz or
# a folder holding cifar-10-batches-py/.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
if [ "${LENGTH:-20}" = 40 ]; then
  OUT=${OUT:-runs/02_reference}
  # The same search for every algorithm (experiment 9's): its learning rates at
  # N = 10 over 5 rounds. A finished search is not run again.
  for a in fsl_sage cse_fsl fsl_an splitfed_v1 fedavg splitfed_v2 sl sglr; do
    [ -f "runs/cifar-tune/tune-$a/best.yaml" ] && continue
    raysage tune --algorithm "$a" --space client_lr=loguniform:1e-4:1e-2 \
      --space server_lr=loguniform:1e-4:1e-2 --samples 6 --rounds 5 --dataset cifar10 \
      --data-dir "$DATA" --model simple_conv --clients 10 --out "runs/cifar-tune/tune-$a"
  done
  raysage sweep experiments/02_paper_scaled/reference.yaml --data-dir "$DATA" --out "$OUT" "$@"
  raysage report "$OUT" --baseline fsl_sage --out docs/results/02_reference
  exit 0
fi
OUT=${OUT:-runs/02_paper_scaled}
raysage sweep experiments/02_paper_scaled/sweep.yaml --data-dir "$DATA" --out "$OUT" "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/02_paper_scaled
