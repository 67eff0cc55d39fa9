#!/usr/bin/env bash
# Submit a raysage simulation to a Ray cluster as a job. Arguments go to
# `raysage simulate`; the dashboard address comes from RAY_ADDRESS.
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh --clients 200 --out /shared/runs/a
# Run from the repository root: the working directory is uploaded (minus
# .rayignore) and `python -m raysage.cli` runs from it, so the cluster needs
# only raysage's dependencies, installed by the runtime environment below.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env-json '{"pip": ["torch", "typer", "rich", "pyyaml", "psutil"]}' \
  -- python -m raysage.cli simulate "$@"
