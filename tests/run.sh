#!/usr/bin/env bash
# The whole test suite: makes sure a RabbitMQ broker answers on 127.0.0.1:5672,
# installs headless Chromium (the dashboard tests' browser) when it is missing,
# builds the "next version" logic server and the previous release, which the
# rolling-upgrade tests run beside the current build, then runs every test of the
# workspace (unit, property, conformance on both transports, and the cross-process
# tests with real binaries and real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."

# The RabbitMQ node with a short consumer timeout (deploy/rabbitmq-node.sh, port
# 5690) is started and stopped by the test that needs it (tests/jobs_cluster.rs); a
# run cut short (the test binary killed) would leave it running: stop it whatever
# happens. (The 3-node cluster of tests/cluster.rs is kept for the next run.)
trap 'bash deploy/rabbitmq-node.sh stop >/dev/null 2>&1 || true' EXIT

bash deploy/ensure-broker.sh

# A real browser for the dashboard tests (tests/dashboard.rs): Debian's chromium.
if ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
    command -v chromium >/dev/null 2>&1 || {
        echo "tests/run.sh: chromium could not be installed; the dashboard tests need it" >&2
        exit 1
    }
fi
export KEELSON_TEST_AMQP_URL=${KEELSON_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

# The next-version build (feature next-preview: another reported version, protocol
# 1.1 with an added optional field, and a handler only it hosts).
cargo build --locked -p keelson --bin logic-server --features test-handlers,next-preview
mkdir -p target/next-bin
cp target/debug/logic-server target/next-bin/logic-server
export KEELSON_NEXT_BIN_DIR="$PWD/target/next-bin"

# The previous release (the last commit of the previous round of work), built from
# its own sources, for the rolling upgrade from it to this build. Rebuilt only when
# the commit changes.
PREVIOUS_RELEASE=dbc35e3287c5bd9c91d34479bc15e4006dd1ed47
if ! git cat-file -e "$PREVIOUS_RELEASE^{commit}" 2>/dev/null; then
    git fetch --quiet origin "$PREVIOUS_RELEASE" 2>/dev/null || git fetch --quiet --unshallow 2>/dev/null || true
fi
git cat-file -e "$PREVIOUS_RELEASE^{commit}" || {
    echo "tests/run.sh: commit $PREVIOUS_RELEASE (the previous release) is not in this clone; the upgrade test needs it" >&2
    exit 1
}
if [ "$(cat target/previous-bin/COMMIT 2>/dev/null)" != "$PREVIOUS_RELEASE" ]; then
    rm -rf target/previous-src target/previous-bin
    mkdir -p target/previous-src target/previous-bin
    git archive "$PREVIOUS_RELEASE" | tar -x -C target/previous-src
    cargo build --locked --manifest-path target/previous-src/Cargo.toml --features test-handlers \
        --bin logic-server --bin ui-gateway --target-dir target/previous-target
    cp target/previous-target/debug/logic-server target/previous-target/debug/ui-gateway target/previous-bin/
    echo "$PREVIOUS_RELEASE" > target/previous-bin/COMMIT
fi
export KEELSON_PREVIOUS_BIN_DIR="$PWD/target/previous-bin"

cargo test --workspace --locked --features keelson/test-handlers "$@"
