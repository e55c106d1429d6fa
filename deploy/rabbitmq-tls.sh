#!/usr/bin/env bash
# A RabbitMQ node with a TLS listener only, on loopback, beside the machine's main
# broker (which it leaves alone), for the TLS test (tests/tls.rs).
#
#   deploy/rabbitmq-tls.sh start CERT_DIR   (re)start the node with the certificates of
#                                           CERT_DIR: ca.pem, server.pem, server-key.pem
#   deploy/rabbitmq-tls.sh stop             stop the node, delete its state
#   deploy/rabbitmq-tls.sh node             its Erlang node name (for rabbitmqctl -n)
#   deploy/rabbitmq-tls.sh port             its TLS port
#
# The node is ktls@HOST (HOST as in deploy/rabbitmq-cluster.sh), AMQP over TLS on
# 127.0.0.1:$KEELSON_TLS_PORT and 127.0.0.2:$KEELSON_TLS_PORT (default 5671; the second
# address lets a test reach it by a name its certificate does not hold), distribution
# on 127.0.0.1:$KEELSON_TLS_DIST_PORT (default 25671), no plain AMQP listener. It
# verifies client certificates against ca.pem when one is shown, but does not require
# one; rabbitmq_auth_mechanism_ssl is enabled, so a client certificate can log in by
# SASL EXTERNAL as the user named by its subject's CN. Certificates are copied into the
# node's own folder ($KEELSON_TLS_DIR, default /tmp/keelson-rabbitmq-tls), owned by
# the user rabbitmq, which the node runs as. A start always stops a node left by an
# earlier run first: its certificates are new each time. Needs root, or sudo.
set -euo pipefail

BASE=${KEELSON_TLS_DIR:-/tmp/keelson-rabbitmq-tls}
PORT=${KEELSON_TLS_PORT:-5671}
DIST_PORT=${KEELSON_TLS_DIST_PORT:-25671}
WAIT_S=${KEELSON_TLS_WAIT_S:-90}
TOOL=rabbitmq-tls
# shellcheck source=deploy/rabbitmq-node-lib.sh
. "$(dirname "$0")/rabbitmq-node-lib.sh"

NODE="ktls@$(node_host)"

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
    local certs=$1 f
    for f in ca.pem server.pem server-key.pem; do
        [ -r "$certs/$f" ] || fail "$certs/$f does not exist or cannot be read"
    done
    if [ -d "$BASE" ] || vm_up; then
        say "stopping the node left by an earlier run"
        stop
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        fail "port $PORT is taken by another process (set KEELSON_TLS_PORT)"
    fi
    as_root mkdir -p "$BASE/mnesia" "$BASE/log" "$BASE/certs"
    as_root cp "$certs/ca.pem" "$certs/server.pem" "$certs/server-key.pem" "$BASE/certs/"
    as_root tee "$BASE/rabbitmq.conf" >/dev/null <<EOF
listeners.tcp = none
listeners.ssl.1 = 127.0.0.1:$PORT
listeners.ssl.2 = 127.0.0.2:$PORT
ssl_options.cacertfile = $BASE/certs/ca.pem
ssl_options.certfile = $BASE/certs/server.pem
ssl_options.keyfile = $BASE/certs/server-key.pem
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
EOF
    as_root tee "$BASE/rabbitmq-env.conf" >/dev/null <<'EOF'
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
ERL_EPMD_ADDRESS=127.0.0.1
EOF
    echo '[rabbitmq_auth_mechanism_ssl].' | as_root tee "$BASE/enabled_plugins" >/dev/null
    as_root chown -R rabbitmq:rabbitmq "$BASE"
    as_root chmod -R go-rwx "$BASE/certs"
    say "starting $NODE, TLS on 127.0.0.1:$PORT, in $BASE"
    as_root su rabbitmq -s /bin/sh -c "cd '$BASE' && exec env \
        RABBITMQ_NODENAME='$NODE' \
        RABBITMQ_NODE_PORT='$PORT' \
        RABBITMQ_DIST_PORT='$DIST_PORT' \
        RABBITMQ_MNESIA_BASE='$BASE/mnesia' \
        RABBITMQ_LOG_BASE='$BASE/log' \
        RABBITMQ_PID_FILE='$BASE/pid' \
        RABBITMQ_ENABLED_PLUGINS_FILE='$BASE/enabled_plugins' \
        RABBITMQ_CONFIG_FILE='$BASE/rabbitmq.conf' \
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
    start)
        [ -n "${2:-}" ] || fail "usage: $0 start CERT_DIR"
        with_lock start "$2"
        ;;
    stop)
        with_lock stop
        say "stopped, and $BASE removed"
        ;;
    node) echo "$NODE" ;;
    port) echo "$PORT" ;;
    *)
        echo "usage: $0 start CERT_DIR|stop|node|port" >&2
        exit 2
        ;;
esac
