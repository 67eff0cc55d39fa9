#!/usr/bin/env bash
# A Ray head on this machine for trying the cluster flow (README, "Running on
# a cluster"): every port on 127.0.0.1, token authentication on, and stopped
# by its own process id.
#
#   eval "$(cluster/local-head.sh start --num-cpus=2)"   # extra flags go to `ray start`
#   cluster/submit.sh --clients 200 --rounds 5 --out /tmp/runs/a
#   cluster/local-head.sh stop
#
# `start` prints the exports that point Ray's job CLI (and cluster/submit.sh)
# at this head in token mode. Settings, all optional:
#   RAYSAGE_GCS_PORT (6379), RAYSAGE_DASHBOARD_PORT (8265)
#   RAYSAGE_HEAD_DIR: pid file, log and Ray's session files (/tmp/raysage-head-$UID)
set -euo pipefail

dir="${RAYSAGE_HEAD_DIR:-/tmp/raysage-head-$(id -u)}"
pidfile="$dir/head.pid"
log="$dir/head.log"
gcs_port="${RAYSAGE_GCS_PORT:-6379}"
dashboard_port="${RAYSAGE_DASHBOARD_PORT:-8265}"
python="$(command -v python3 || command -v python)"

running() { [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

# $1 distinct free ports on 127.0.0.1, all held until every one is chosen, none of
# the ports that follow (the GCS's and the dashboard's, not bound yet).
free_ports() {
  "$python" -c 'import socket, sys
count, taken = int(sys.argv[1]), {int(p) for p in sys.argv[2:]}
held = []
while len([s for s in held if s.getsockname()[1] not in taken]) < count:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(p) for p in [s.getsockname()[1] for s in held] if p not in taken))' "$@"
}

answers() {  # $1: URL; true once it answers 200
  "$python" - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except Exception:
    sys.exit(1)
EOF
}

listens() {  # $1: port on 127.0.0.1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
  # Under `eval "$(... start)"` a failure must fail the eval too, not eval nothing.
  trap 'status=$?; if ((status != 0)); then echo false; fi' EXIT
  if running; then
    echo "error: a head started by this script already runs (pid $(cat "$pidfile")); stop it" \
         "with: $0 stop" >&2
    exit 1
  fi
  mkdir -p "$dir"
  # Ray 2.60 enables token authentication on `ray start` only when a token
  # already exists; in token mode it refuses to start without one. Generate it
  # once (~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH); an existing one is kept.
  export RAY_AUTH_MODE=token
  if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    ray get-auth-token --generate >/dev/null
  fi
  # Ray turns --node-ip-address=127.0.0.1 into the machine's address and binds
  # the GCS, raylet and workers on every interface; in its single-machine mode
  # (the one it uses on macOS and Windows) everything binds to 127.0.0.1.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  # Agent ports of our own, so another Ray instance on this machine holding
  # the defaults cannot keep this head's job agent from starting.
  local agent_http agent_grpc runtime_env client metrics
  read -r agent_http agent_grpc runtime_env client metrics \
    < <(free_ports 5 "$gcs_port" "$dashboard_port")
  # --block keeps the head's processes under this one pid: `stop` ends it
  # gracefully, where `ray stop` would end every Ray instance on the machine.
  # Its own session, so that closing this terminal does not end it.
  local detach=(setsid)
  if ! command -v setsid >/dev/null; then detach=(); set -m; fi   # macOS: own group only
  "${detach[@]}" ray start --head --block --port="$gcs_port" --node-ip-address=127.0.0.1 \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --dashboard-agent-listen-port="$agent_http" --dashboard-agent-grpc-port="$agent_grpc" \
    --runtime-env-agent-port="$runtime_env" --ray-client-server-port="$client" \
    --metrics-export-port="$metrics" --temp-dir="$dir/ray" --disable-usage-stats "$@" \
    >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  # Ready when the dashboard answers and its job agent listens (before that,
  # a submitted job is refused with "No available agent").
  local deadline=$((SECONDS + ${RAYSAGE_HEAD_TIMEOUT:-180}))
  until answers "http://127.0.0.1:$dashboard_port/api/gcs_healthz" && listens "$agent_http"; do
    if ! running; then
      echo "error: the Ray head did not start; its log, $log, ends with:" >&2
      tail -n 5 "$log" >&2
      rm -f "$pidfile"
      exit 1
    fi
    if ((SECONDS > deadline)); then
      echo "error: the Ray head did not come up within ${RAYSAGE_HEAD_TIMEOUT:-180} s;" \
           "see $log; end it with: $0 stop" >&2
      exit 1
    fi
    sleep 1
  done
  echo "Ray head on 127.0.0.1 (pid $(cat "$pidfile"); GCS 127.0.0.1:$gcs_port, dashboard" \
       "http://127.0.0.1:$dashboard_port, log $log)" >&2
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port RAY_AUTH_MODE=token"
}

stop() {
  if ! running; then
    echo "no head started by $0 runs (no live pid in $pidfile)" >&2
    rm -f "$pidfile"
    return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  # SIGTERM to the `ray start --block` process alone: it ends its processes
  # in order. Signalling the whole group at once can leave the GCS behind.
  kill -TERM "$pid"
  local deadline=$((SECONDS + 30))
  while pgrep -g "$pid" >/dev/null 2>&1 && ((SECONDS < deadline)); do sleep 1; done
  if pgrep -g "$pid" >/dev/null 2>&1; then
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "stopped the Ray head (pid $pid)" >&2
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 start [ray start flags] | stop" >&2; exit 2 ;;
esac
