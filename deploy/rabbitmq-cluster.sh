#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback, beside the machine's main broker (which it
# leaves alone), for the tests that lose a broker node (tests/cluster.rs).
#
#   deploy/rabbitmq-cluster.sh start        start the cluster, or reuse it when healthy
#   deploy/rabbitmq-cluster.sh stop         stop the three nodes, delete their state
#   deploy/rabbitmq-cluster.sh stop-app N   `rabbitmqctl stop_app` on node N (1-3)
#   deploy/rabbitmq-cluster.sh start-app N  `rabbitmqctl start_app` on node N
#   deploy/rabbitmq-cluster.sh ports        one line per node: name, AMQP port, dist port
#
# Node N is kN@HOST, AMQP on 127.0.0.1:568N, distribution on 127.0.0.1:2568N. HOST is
# `hostname -s` when that name resolves to 127.0.0.1 (the nodes listen on loopback
# only), else localhost; KEELSON_CLUSTER_HOST overrides it. Each node has its own
# files under $KEELSON_CLUSTER_DIR (default /tmp/keelson-rabbitmq-cluster), owned by
# the user rabbitmq, and runs as that user: the nodes, the main broker and rabbitmqctl
# (which the Debian package runs as rabbitmq) then share the Erlang cookie in
# ~rabbitmq/.erlang.cookie. Needs root, or sudo.
set -euo pipefail

BASE=${KEELSON_CLUSTER_DIR:-/tmp/keelson-rabbitmq-cluster}
WAIT_S=${KEELSON_CLUSTER_WAIT_S:-90}
NODES=(1 2 3)
TOOL=rabbitmq-cluster
# shellcheck source=deploy/rabbitmq-node-lib.sh
. "$(dirname "$0")/rabbitmq-node-lib.sh"

HOST=$(node_host)

node_name() { echo "k$1@$HOST"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }
node_dir() { echo "$BASE/k$1"; }
ctl() {
    local n=$1
    shift
    as_root rabbitmqctl -q -n "$(node_name "$n")" "$@"
}

check_node() {
    case "${1:-}" in
        1 | 2 | 3) ;;
        *) fail "no node ${1:-(none)}: nodes are 1, 2 and 3" ;;
    esac
}

# Whether node N's Erlang VM answers, and whether its RabbitMQ application runs.
vm_up() { ctl "$1" ping >/dev/null 2>&1; }
app_up() { [ "$(ctl "$1" eval 'rabbit:is_running().' 2>/dev/null)" = true ]; }

# How many nodes node 1 sees running in its cluster.
running_count() { ctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo 0; }

healthy() {
    local n
    for n in "${NODES[@]}"; do app_up "$n" || return 1; done
    [ "$(running_count)" = 3 ]
}

show_logs() {
    local n log
    for n in "${NODES[@]}"; do
        log="$(node_dir "$n")/log/$(node_name "$n").log"
        if [ -f "$log" ]; then
            echo "--- last lines of $log" >&2
            tail -n 30 "$log" >&2
        fi
    done
}

start_node() {
    local n=$1 dir
    dir=$(node_dir "$n")
    mkdir -p "$dir/mnesia" "$dir/log"
    echo "listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")" >"$dir/rabbitmq.conf"
    cat >"$dir/rabbitmq-env.conf" <<'EOF'
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
ERL_EPMD_ADDRESS=127.0.0.1
EOF
    echo '[].' >"$dir/enabled_plugins"
    as_root chown -R rabbitmq:rabbitmq "$BASE"
    as_root su rabbitmq -s /bin/sh -c "cd '$dir' && exec env \
        RABBITMQ_NODENAME='$(node_name "$n")' \
        RABBITMQ_NODE_PORT='$(amqp_port "$n")' \
        RABBITMQ_DIST_PORT='$(dist_port "$n")' \
        RABBITMQ_MNESIA_BASE='$dir/mnesia' \
        RABBITMQ_LOG_BASE='$dir/log' \
        RABBITMQ_PID_FILE='$dir/pid' \
        RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins' \
        RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf' \
        RABBITMQ_CONF_ENV_FILE='$dir/rabbitmq-env.conf' \
        '$SERVER' -detached" 9>&-
}

stop_node() {
    local n=$1 pid_file pid
    pid_file="$(node_dir "$n")/pid"
    if vm_up "$n"; then
        if [ -f "$pid_file" ]; then
            ctl "$n" stop "$pid_file" >/dev/null 2>&1 || true
        else
            ctl "$n" stop >/dev/null 2>&1 || true
        fi
    fi
    # A node that does not answer but whose process lives (it was starting, or hung).
    if [ -f "$pid_file" ]; then
        pid=$(cat "$pid_file")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
}

stop_all() {
    local n
    for n in "${NODES[@]}"; do stop_node "$n"; done
    as_root rm -rf "$BASE"
}

start_all() {
    local n
    for n in "${NODES[@]}"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$(amqp_port "$n")") 2>/dev/null; then
            fail "port $(amqp_port "$n") of node $n is taken by another process"
        fi
    done
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do
        if ! ctl "$n" wait "$(node_dir "$n")/pid" --timeout "$WAIT_S" >/dev/null; then
            show_logs
            fail "node $(node_name "$n") did not start within ${WAIT_S}s"
        fi
    done
    local out
    for n in 2 3; do
        if ! out=$(ctl "$n" stop_app 2>&1 && ctl "$n" join_cluster "$(node_name 1)" 2>&1 &&
            ctl "$n" start_app 2>&1); then
            echo "$out" >&2
            show_logs
            fail "node $(node_name "$n") could not join $(node_name 1)"
        fi
    done
}

# Bring back what a run that stopped half-way left: applications stopped on a live VM.
repair() {
    local n
    for n in "${NODES[@]}"; do
        vm_up "$n" || return 1
        if ! app_up "$n"; then
            say "starting the application of $(node_name "$n") again"
            ctl "$n" start_app || return 1
        fi
    done
}

wait_healthy() {
    local deadline=$((SECONDS + WAIT_S))
    until healthy; do
        if ((SECONDS >= deadline)); then
            show_logs
            fail "the cluster does not run 3 nodes within ${WAIT_S}s (node 1 sees $(running_count))"
        fi
        sleep 1
    done
}

start() {
    if healthy; then
        say "reusing the running cluster $(node_name 1), $(node_name 2), $(node_name 3)"
        return
    fi
    if [ -d "$BASE" ] && repair && healthy; then
        say "repaired the running cluster"
        return
    fi
    if [ -d "$BASE" ] || vm_up 1 || vm_up 2 || vm_up 3; then
        say "stopping what is left of an earlier cluster"
        stop_all
    fi
    say "starting $(node_name 1), $(node_name 2), $(node_name 3) in $BASE"
    as_root mkdir -p "$BASE"
    start_all
    wait_healthy
    say "cluster running: $(node_name 1), $(node_name 2), $(node_name 3)"
}

command -v rabbitmqctl >/dev/null || fail "rabbitmqctl is not installed (apt-get install rabbitmq-server)"
[ -x "$SERVER" ] || fail "$SERVER does not exist (RabbitMQ from the Debian package is expected)"

# Serialises starts and stops (two test binaries may ask at once). The nodes must not
# inherit the lock's descriptor (see start_node): they would hold it for good.
with_lock() {
    exec 9>"$BASE.lock"
    flock -w $((WAIT_S * 2)) 9 || fail "another start or stop of the cluster holds $BASE.lock"
    "$@"
}

case "${1:-}" in
    start) with_lock start ;;
    stop)
        with_lock stop_all
        say "stopped, and $BASE removed"
        ;;
    stop-app)
        check_node "${2:-}"
        ctl "$2" stop_app
        ;;
    start-app)
        check_node "${2:-}"
        ctl "$2" start_app
        ctl "$2" await_startup --timeout "$WAIT_S"
        ;;
    ports)
        for n in "${NODES[@]}"; do
            echo "$(node_name "$n") $(amqp_port "$n") $(dist_port "$n")"
        done
        ;;
    *)
        echo "usage: $0 start|stop|stop-app N|start-app N|ports" >&2
        exit 2
        ;;
esac
