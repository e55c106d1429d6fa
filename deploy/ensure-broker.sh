#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672.
#
#   1. a broker already answering is used as it is;
#   2. else an installed `rabbitmq-server` is started;
#   3. else `rabbitmq-server` is installed with apt-get, then started.
#
# Exits non-zero, saying why, when no broker can be had: tests that need one must
# fail loudly rather than skip.
set -euo pipefail

HOST=127.0.0.1
PORT=${KEELSON_BROKER_PORT:-5672}
WAIT_S=${KEELSON_BROKER_WAIT_S:-90}

answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

wait_for_broker() {
    local deadline=$((SECONDS + WAIT_S))
    while ! answers; do
        if ((SECONDS >= deadline)); then
            echo "ensure-broker: RabbitMQ did not answer on $HOST:$PORT within ${WAIT_S}s" >&2
            return 1
        fi
        sleep 1
    done
    # The port opens before the broker accepts AMQP sessions; wait for that too.
    if command -v rabbitmqctl >/dev/null; then
        rabbitmqctl -q await_startup --timeout "$WAIT_S" >/dev/null 2>&1 || true
    fi
}

if answers; then
    echo "ensure-broker: using the broker already answering on $HOST:$PORT"
    exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v rabbitmq-server >/dev/null; then
    echo "ensure-broker: no broker on $HOST:$PORT and rabbitmq-server is not installed; installing it"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server
fi

if ! answers; then
    echo "ensure-broker: starting the installed rabbitmq-server"
    as_root rabbitmq-server -detached || true
fi

if wait_for_broker; then
    echo "ensure-broker: RabbitMQ answers on $HOST:$PORT"
else
    echo "ensure-broker: FAILED: no RabbitMQ broker could be had on $HOST:$PORT" >&2
    exit 1
fi
