#!/usr/bin/env bash
# A local distributed Keelson mesh on the local RabbitMQ broker.
#
#   deploy/local-mesh.sh start [LOGIC_SERVERS=2] [GATEWAYS=1]
#       builds the release binaries, starts N logic servers and M gateways
#       (gateway i listens on 127.0.0.1:$((8080 + i)), from 8081), waits until each
#       is ready, and prints where they are;
#   deploy/local-mesh.sh stop
#       SIGTERM to every process it started (they drain and exit 0), then waits;
#   deploy/local-mesh.sh status
#       which of them are running.
#
# State (pids, logs) lives in .keelson/mesh/. Configuration: config/gateway.toml and
# config/logic-server.toml, with KEELSON__ overrides per process.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.keelson/mesh
BASE_PORT=${KEELSON_MESH_BASE_PORT:-8080}
READY_TIMEOUT_S=${KEELSON_MESH_READY_TIMEOUT_S:-30}

wait_ready() { # log-file pattern pid
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until grep -q "$2" "$1" 2>/dev/null; do
        if ! kill -0 "$3" 2>/dev/null; then
            echo "local-mesh: process $3 died; its log ($1):" >&2
            cat "$1" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "local-mesh: process $3 not ready within ${READY_TIMEOUT_S}s; see $1" >&2
            return 1
        fi
        sleep 0.2
    done
}

start() {
    local servers=${1:-2} gateways=${2:-1}
    if ls "$STATE"/*.pid >/dev/null 2>&1; then
        echo "local-mesh: already started (run '$0 stop' first)" >&2
        exit 1
    fi
    bash deploy/ensure-broker.sh
    cargo build --release --quiet --bin logic-server --bin ui-gateway --bin keelson
    mkdir -p "$STATE"
    for i in $(seq 1 "$servers"); do
        KEELSON__NODE__ID="logic-$i" \
            target/release/logic-server --config config/logic-server.toml \
            >"$STATE/logic-$i.out" 2>"$STATE/logic-$i.log" &
        echo $! >"$STATE/logic-$i.pid"
        wait_ready "$STATE/logic-$i.out" "ready" $!
        echo "logic server logic-$i ready (pid $!, log $STATE/logic-$i.log)"
    done
    for i in $(seq 1 "$gateways"); do
        local port=$((BASE_PORT + i))
        KEELSON__NODE__ID="gateway-$i" KEELSON__GATEWAY__LISTEN="127.0.0.1:$port" \
            target/release/ui-gateway --config config/gateway.toml \
            >"$STATE/gateway-$i.out" 2>"$STATE/gateway-$i.log" &
        echo $! >"$STATE/gateway-$i.pid"
        wait_ready "$STATE/gateway-$i.out" "listening on" $!
        echo "gateway gateway-$i on http://127.0.0.1:$port (pid $!, log $STATE/gateway-$i.log)"
    done
}

stop() {
    local pids=() f
    for f in "$STATE"/*.pid; do
        [ -e "$f" ] || continue
        local pid
        pid=$(cat "$f")
        if kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
        rm -f "$f"
    done
    local deadline=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                echo "local-mesh: $pid did not stop within 30s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.1
        done
    done
    echo "local-mesh: stopped ${#pids[@]} processes"
}

status() {
    local f
    for f in "$STATE"/*.pid; do
        [ -e "$f" ] || { echo "local-mesh: not running"; return; }
        local name pid
        name=$(basename "$f" .pid)
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then echo "$name running (pid $pid)"; else echo "$name gone"; fi
    done
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [LOGIC_SERVERS] [GATEWAYS] | stop | status" >&2; exit 2 ;;
esac
