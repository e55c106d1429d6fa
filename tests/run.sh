#!/usr/bin/env bash
# The whole test suite: makes sure a RabbitMQ broker answers on 127.0.0.1:5672, then
# runs every test of the workspace (unit, property, conformance on both transports,
# and the cross-process tests with real binaries and real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/ensure-broker.sh
export KEELSON_TEST_AMQP_URL=${KEELSON_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
cargo test --workspace --locked --features keelson/test-handlers "$@"
