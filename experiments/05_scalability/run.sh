#!/usr/bin/env bash
# Experiment 5: scalability over clients (10 ... 10,000) and over workers (1, 2, 4;
# threads).
# Expected runtime: about 75 minutes on 2 CPU cores (FSL-SAGE's round 0 at 10,000
# clients aligns 10,000 auxiliary models). Run it on an otherwise
# idle machine: it measures host wall time and memory.
set -euo pipefail
OUT=${OUT:-runs/05_scalability}
raysage sweep experiments/05_scalability/clients.yaml --out "$OUT/clients" --parallel 1 "$@"
raysage sweep experiments/05_scalability/workers.yaml --out "$OUT/workers" "$@"
raysage report "$OUT" --baseline fsl_sage --out docs/results/05_scalability
