# Shared by deploy/rabbitmq-cluster.sh, deploy/rabbitmq-tls.sh and
# deploy/rabbitmq-node.sh, which run extra RabbitMQ nodes on loopback beside the
# machine's main broker. Sourced after the caller sets TOOL (its name, for messages).

# Not /usr/sbin/rabbitmq-server: run as rabbitmq, the Debian wrapper writes the
# node's output over the main broker's /var/log/rabbitmq/startup_log.
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server

say() { echo "$TOOL: $*"; }
fail() {
    echo "$TOOL: FAILED: $*" >&2
    exit 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The host part of the nodes' names: the short host name when it resolves to
# loopback (the nodes listen there only), else localhost; KEELSON_CLUSTER_HOST wins.
node_host() {
    if [ -n "${KEELSON_CLUSTER_HOST:-}" ]; then
        echo "$KEELSON_CLUSTER_HOST"
        return
    fi
    local short
    short=$(hostname -s)
    if [ "$(getent ahostsv4 "$short" | awk 'NR == 1 { print $1 }')" = 127.0.0.1 ]; then
        echo "$short"
    else
        echo localhost
    fi
}
