#!/usr/bin/env bash
# run.sh: the README's first command. Makes Postgres and NATS reachable (reusing running servers,
# else starting throwaway ones via scripts/dev-services.sh), then runs the `deepnode up` demo, which
# migrates, starts the services and simulated nodes and shows the live view. Extra arguments go to
# `deepnode up` (e.g. `scripts/run.sh --duration 30s`). `scripts/dev-services.sh down` stops what
# was started.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/deepnode}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}

scripts/dev-services.sh up
# Every binary: `deepnode up` starts the three services from the directory it runs from.
cargo build --release --bins
exec "${CARGO_TARGET_DIR:-target}/release/deepnode" up "$@"
