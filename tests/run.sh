#!/usr/bin/env bash
# The whole test suite: makes sure a RabbitMQ broker answers on 127.0.0.1:5672,
# builds the "next version" logic server the rolling-upgrade test runs beside the
# current one, then runs every test of the workspace (unit, property, conformance on
# both transports, and the cross-process tests with real binaries and real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/ensure-broker.sh
export KEELSON_TEST_AMQP_URL=${KEELSON_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

# The next-version build (feature next-preview: another reported version, protocol
# 1.1 with an added optional field, and a handler only it hosts).
cargo build --locked -p keelson --bin logic-server --features test-handlers,next-preview
mkdir -p target/next-bin
cp target/debug/logic-server target/next-bin/logic-server
export KEELSON_NEXT_BIN_DIR="$PWD/target/next-bin"

cargo test --workspace --locked --features keelson/test-handlers "$@"
