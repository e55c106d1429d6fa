#!/usr/bin/env bash
# Rolling upgrade of the logic servers of a local mesh (deploy/local-mesh.sh), one at
# a time, with no failed request:
#
#   deploy/rolling-upgrade.sh [--bin NEW_LOGIC_SERVER] [--config NEW_CONFIG] [--ready-timeout SECONDS]
#
# or of the logic-server@N units of deploy/systemd (install the new binary first):
#
#   deploy/rolling-upgrade.sh --systemd "1 2 3"
#
# The units are Type=notify: `systemctl restart` drains the old server and returns
# once the new one sent READY=1 (joined the context channel, consuming), or fails
# when it does not within the unit's TimeoutStartSec. No polling.
#
# For each logic server in turn: SIGTERM (it stops taking requests, finishes and
# answers what it holds, announces that it leaves, exits 0); wait for the exit;
# start the new binary or configuration; wait until the cluster status (heartbeats
# on the control channel, `keelson status`) shows the new server up; go on. If a new
# server does not become ready in time, stop and say why: the servers not yet
# upgraded keep running the old version, so the mesh keeps serving.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.keelson/mesh
BIN=target/release/logic-server
CONFIG=config/logic-server.toml
READY_TIMEOUT_S=60
DRAIN_WAIT_S=${KEELSON_DRAIN_WAIT_S:-30}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --ready-timeout) READY_TIMEOUT_S=$2; shift 2 ;;
        --systemd) SYSTEMD_INSTANCES=$2; shift 2 ;;
        *) echo "usage: $0 [--bin PATH] [--config FILE] [--ready-timeout SECONDS] | --systemd \"1 2 3\"" >&2; exit 2 ;;
    esac
done

if [ -n "${SYSTEMD_INSTANCES:-}" ]; then
    for i in $SYSTEMD_INSTANCES; do
        echo "rolling-upgrade: logic-server@$i: restarting"
        if ! systemctl restart "logic-server@$i"; then
            echo "rolling-upgrade: logic-server@$i did not become ready; stopping the upgrade (journalctl -u logic-server@$i)" >&2
            exit 1
        fi
        echo "rolling-upgrade: logic-server@$i: ready"
    done
    echo "rolling-upgrade: all logic servers upgraded"
    exit 0
fi

[ -x "$BIN" ] || { echo "rolling-upgrade: $BIN is not an executable" >&2; exit 1; }
STATUS_BIN=target/release/keelson
[ -x "$STATUS_BIN" ] || cargo build --release --quiet --bin keelson

node_up() { # node-id
    "$STATUS_BIN" status --listen-ms 1500 --config "$CONFIG" --expect-up "$1" >/dev/null 2>&1
}

shopt -s nullglob
pids=("$STATE"/logic-*.pid)
[ ${#pids[@]} -gt 0 ] || { echo "rolling-upgrade: no logic server in $STATE (start one with deploy/local-mesh.sh)" >&2; exit 1; }

for pidfile in "${pids[@]}"; do
    name=$(basename "$pidfile" .pid)
    pid=$(cat "$pidfile")
    echo "rolling-upgrade: $name (pid $pid): draining"
    kill -TERM "$pid" 2>/dev/null || echo "rolling-upgrade: $name was not running"
    deadline=$((SECONDS + DRAIN_WAIT_S))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "rolling-upgrade: $name did not exit within ${DRAIN_WAIT_S}s of SIGTERM; stopping the upgrade" >&2
            exit 1
        fi
        sleep 0.1
    done
    node="$name-$(date +%s)"
    KEELSON__NODE__ID="$node" "$BIN" --config "$CONFIG" >"$STATE/$name.out" 2>"$STATE/$name.log" &
    echo $! >"$pidfile"
    echo "rolling-upgrade: $name: started $BIN as node $node (pid $!); waiting until the cluster shows it up"
    deadline=$((SECONDS + READY_TIMEOUT_S))
    until node_up "$node"; do
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "rolling-upgrade: the new $name exited; its log ($STATE/$name.log):" >&2
            tail -20 "$STATE/$name.log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "rolling-upgrade: the new $name is not up after ${READY_TIMEOUT_S}s; stopping the upgrade (see $STATE/$name.log)" >&2
            exit 1
        fi
    done
    echo "rolling-upgrade: $name: up"
done
echo "rolling-upgrade: all ${#pids[@]} logic servers upgraded"
