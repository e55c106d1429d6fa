#!/usr/bin/env bash
# A single RabbitMQ node on loopback with a short consumer timeout, beside the
# machine's main broker (which it leaves alone), for the test of a job that runs
# longer than the broker's `consumer_timeout` (tests/jobs_cluster.rs). The timeout is
# broker-wide in RabbitMQ 3.10 (no per-queue setting), so shortening it on the main
# broker would close the channels of other tests that hold deliveries for seconds.
#
#   deploy/rabbitmq-node.sh start   start the node (a node left by an earlier run is
#                                   stopped first: its settings may differ)
#   deploy/rabbitmq-node.sh stop    stop the node, delete its state
#   deploy/rabbitmq-node.sh node    its Erlang node name (for rabbitmqctl -n)
#   deploy/rabbitmq-node.sh port    its AMQP port
#   deploy/rabbitmq-node.sh log     print the node's log (a test reads which channels
#                                   the broker closed)
#
# The node is kshort@HOST (HOST as in deploy/rabbitmq-cluster.sh), AMQP on
# 127.0.0.1:$KEELSON_NODE_PORT (default 5690), distribution on
# 127.0.0.1:$KEELSON_NODE_DIST_PORT (default 25690). Its settings:
#   consumer_timeout       $KEELSON_NODE_CONSUMER_TIMEOUT_MS (default 5000)
#   channel_tick_interval  $KEELSON_NODE_TICK_MS (default 1000)
# A channel checks its deliveries against consumer_timeout only on its tick, every
# channel_tick_interval (60 s by default in 3.10.8): with the default, a 5 s timeout
# closed a channel 60 s after it opened (protocol/TOPOLOGY.md, "Background work").
# Files under $KEELSON_NODE_DIR (default /tmp/keelson-rabbitmq-node), owned by the
# user rabbitmq, which the node runs as. Needs root, or sudo.
set -euo pipefail

BASE=${KEELSON_NODE_DIR:-/tmp/keelson-rabbitmq-node}
PORT=${KEELSON_NODE_PORT:-5690}
DIST_PORT=${KEELSON_NODE_DIST_PORT:-25690}
TIMEOUT_MS=${KEELSON_NODE_CONSUMER_TIMEOUT_MS:-5000}
TICK_MS=${KEELSON_NODE_TICK_MS:-1000}
WAIT_S=${KEELSON_NODE_WAIT_S:-90}
TOOL=rabbitmq-node
# shellcheck source=deploy/rabbitmq-node-lib.sh
. "$(dirname "$0")/rabbitmq-node-lib.sh"

NODE="kshort@$(node_host)"

ctl() { as_root rabbitmqctl -q -n "$NODE" "$@"; }
vm_up() { ctl ping >/dev/null 2>&1; }

show_log() {
    local log="$BASE/log/$NODE.log"
    if [ -f "$log" ]; then
        echo "--- last lines of $log" >&2
        tail -n 40 "$log" >&2
    fi
}

stop() {
    if vm_up; then
        if [ -f "$BASE/pid" ]; then
            ctl stop "$BASE/pid" >/dev/null 2>&1 || true
        else
            ctl stop >/dev/null 2>&1 || true
        fi
    fi
    # A node that does not answer but whose process lives (it was starting, or hung).
    if [ -f "$BASE/pid" ]; then
        local pid
        pid=$(cat "$BASE/pid")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    as_root rm -rf "$BASE"
}

start() {
    case "$TIMEOUT_MS$TICK_MS" in
        *[!0-9]*) fail "KEELSON_NODE_CONSUMER_TIMEOUT_MS and KEELSON_NODE_TICK_MS are milliseconds" ;;
    esac
    if [ -d "$BASE" ] || vm_up; then
        say "stopping the node left by an earlier run"
        stop
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        fail "port $PORT is taken by another process (set KEELSON_NODE_PORT)"
    fi
    as_root mkdir -p "$BASE/mnesia" "$BASE/log"
    as_root tee "$BASE/rabbitmq.conf" >/dev/null <<EOF
listeners.tcp.1 = 127.0.0.1:$PORT
consumer_timeout = $TIMEOUT_MS
EOF
    # Not in rabbitmq.conf's schema: advanced.config only.
    echo "[{rabbit, [{channel_tick_interval, $TICK_MS}]}]." |
        as_root tee "$BASE/advanced.config" >/dev/null
    as_root tee "$BASE/rabbitmq-env.conf" >/dev/null <<'EOF'
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
ERL_EPMD_ADDRESS=127.0.0.1
EOF
    echo '[].' | as_root tee "$BASE/enabled_plugins" >/dev/null
    as_root chown -R rabbitmq:rabbitmq "$BASE"
    say "starting $NODE, AMQP on 127.0.0.1:$PORT, consumer_timeout ${TIMEOUT_MS} ms, channel tick ${TICK_MS} ms, in $BASE"
    as_root su rabbitmq -s /bin/sh -c "cd '$BASE' && exec env \
        RABBITMQ_NODENAME='$NODE' \
        RABBITMQ_NODE_PORT='$PORT' \
        RABBITMQ_DIST_PORT='$DIST_PORT' \
        RABBITMQ_MNESIA_BASE='$BASE/mnesia' \
        RABBITMQ_LOG_BASE='$BASE/log' \
        RABBITMQ_PID_FILE='$BASE/pid' \
        RABBITMQ_ENABLED_PLUGINS_FILE='$BASE/enabled_plugins' \
        RABBITMQ_CONFIG_FILE='$BASE/rabbitmq.conf' \
        RABBITMQ_ADVANCED_CONFIG_FILE='$BASE/advanced.config' \
        RABBITMQ_CONF_ENV_FILE='$BASE/rabbitmq-env.conf' \
        '$SERVER' -detached" 9>&-
    if ! ctl wait "$BASE/pid" --timeout "$WAIT_S" >/dev/null; then
        show_log
        fail "node $NODE did not start within ${WAIT_S}s"
    fi
    local deadline=$((SECONDS + WAIT_S))
    until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            show_log
            fail "node $NODE runs but does not listen on 127.0.0.1:$PORT"
        fi
        sleep 0.2
    done
    # The settings the node runs with, not only those it was given.
    local timeout tick
    timeout=$(ctl eval 'application:get_env(rabbit, consumer_timeout).')
    tick=$(ctl eval 'application:get_env(rabbit, channel_tick_interval).')
    if [ "$timeout" != "{ok,$TIMEOUT_MS}" ] || [ "$tick" != "{ok,$TICK_MS}" ]; then
        show_log
        fail "node $NODE runs with consumer_timeout $timeout and channel_tick_interval $tick"
    fi
    say "running: $NODE"
}

command -v rabbitmqctl >/dev/null || fail "rabbitmqctl is not installed (apt-get install rabbitmq-server)"
[ -x "$SERVER" ] || fail "$SERVER does not exist (RabbitMQ from the Debian package is expected)"

# Serialises starts and stops. The node must not inherit the lock's descriptor.
with_lock() {
    exec 9>"$BASE.lock"
    flock -w $((WAIT_S * 2)) 9 || fail "another start or stop of the node holds $BASE.lock"
    "$@"
}

case "${1:-}" in
    start) with_lock start ;;
    stop)
        with_lock stop
        say "stopped, and $BASE removed"
        ;;
    node) echo "$NODE" ;;
    port) echo "$PORT" ;;
    log)
        [ -f "$BASE/log/$NODE.log" ] || fail "no log at $BASE/log/$NODE.log: the node does not run"
        as_root cat "$BASE/log/$NODE.log"
        ;;
    *)
        echo "usage: $0 start|stop|node|port|log" >&2
        exit 2
        ;;
esac
