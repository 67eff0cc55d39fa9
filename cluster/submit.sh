#!/usr/bin/env bash
# Submit a raysage simulation (or sweep, or search) to a Ray cluster as a job;
# arguments go to `raysage simulate`, or to `raysage sweep` / `raysage tune`
# after a first word `sweep` / `tune`.
# It follows the job's log until the job ends (Ctrl-C stops following, not
# the job) and exits non-zero if the job failed.
#   cluster/submit.sh --clients 200 --out /shared/runs/a
#   cluster/submit.sh sweep --grid seed=1,2,3 --out /shared/runs/seeds
#   cluster/submit.sh tune --space client_lr=loguniform:1e-4:1e-1 --out /shared/runs/lr
# The job API address comes from RAY_API_SERVER_ADDRESS (what `eval
# "$(cluster/local-head.sh start)"` or `ray dashboard` sets up), else from an
# http(s) RAY_ADDRESS, else http://127.0.0.1:8265.
# Run from the repository root: the working directory is uploaded (minus
# .rayignore) and `python -m raysage.cli` runs from it with the cluster's
# Python, which must have raysage's dependencies (cluster/ray-cluster.yaml
# installs them; a local head uses the environment that started it). For a
# cluster without them, pass a runtime environment that installs them, e.g.
#   RAYSAGE_RUNTIME_ENV_JSON='{"pip": ["torch", "pyarrow", "typer", "rich", "pyyaml", "psutil"]}'
set -euo pipefail
cd "$(dirname "$0")/.."

address="${RAY_API_SERVER_ADDRESS:-}"
if [[ -z "$address" && "${RAY_ADDRESS:-}" == http* ]]; then
  address="$RAY_ADDRESS"
fi
address="${address:-http://127.0.0.1:8265}"

# Ray 2.60's job CLI sends the cluster's token (RAY_AUTH_TOKEN, else
# ~/.ray/auth_token) only in token mode; without it a cluster with token
# authentication answers 401. Token mode is harmless against one without.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

runtime_env=()
if [[ -n "${RAYSAGE_RUNTIME_ENV_JSON:-}" ]]; then
  runtime_env=(--runtime-env-json "$RAYSAGE_RUNTIME_ENV_JSON")
fi

command=simulate
if [[ "${1:-}" == sweep || "${1:-}" == tune ]]; then
  command="$1"
  shift
fi

exec ray job submit --address "$address" --working-dir . ${runtime_env[@]+"${runtime_env[@]}"} \
  -- python -m raysage.cli "$command" "$@"
