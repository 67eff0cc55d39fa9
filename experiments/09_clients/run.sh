#!/usr/bin/env bash
# Experiment 9: FSL-SAGE, CSE-FSL, SplitFed v2 and FedAvg as the CIFAR-10
# subset is split over 10 to 1,000 clients (see sweep.yaml).
# Past 1,000 clients on synthetic data: synthetic.yaml.
# Expected runtime on 2 CPU cores (measured): tuning about 30 minutes (skip it
# with TUNE=0: sweep.yaml holds the rates it found), seed 200 of sweep.yaml 87
# minutes, seeds 201-202 about three hours more, all.yaml 18 minutes a seed,
# synthetic.yaml 84 minutes (one run at a time while two others shared the cores).
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10_subset.npz}
OUT=${OUT:-runs/09_clients}

if [ "${TUNE:-1}" != 0 ]; then
  # The same search for every algorithm: its learning rates at N = 10 over the five
  # epochs every run of the study trains for. sweep.yaml's per_algorithm block holds
  # what each best.yaml says.
  for a in fsl_sage cse_fsl splitfed_v2 fedavg; do
    raysage tune --algorithm "$a" --space client_lr=loguniform:1e-4:1e-2 \
      --space server_lr=loguniform:1e-4:1e-2 --samples 6 --rounds 5 --dataset cifar10 \
      --data-dir "$DATA" --model simple_conv --clients 10 --out "runs/cifar-tune/tune-$a"
  done
fi

raysage sweep experiments/09_clients/sweep.yaml --data-dir "$DATA" --out "$OUT/ten"
raysage sweep experiments/09_clients/all.yaml --data-dir "$DATA" --out "$OUT/all"
raysage sweep experiments/09_clients/synthetic.yaml --out "$OUT/synthetic"
raysage report "$OUT/ten" --panels clients --out docs/results/09_clients
# All clients taking part: 10 (sweep.yaml's), 50 and 100 clients.
raysage report "$OUT"/ten/clients=10__* "$OUT/all" --panels clients --out docs/results/09_clients_all
raysage report "$OUT/synthetic" --panels clients --out docs/results/09_clients_synthetic
