#!/usr/bin/env bash
# test.sh: the local gate, and exactly what CI runs (.ci/run calls it).
#
# Makes Postgres and NATS reachable (scripts/dev-services.sh up: reuses running servers, else starts
# throwaway ones), then: rustfmt check, clippy with -D warnings, the architecture invariant (the pure
# domain crate pulls in no tokio/sqlx/async-nats), and every test in the workspace (cargo-nextest if
# installed, after the doctests, which nextest does not run; else cargo test). Exits non-zero on the first
# failure. Tests read DATABASE_URL and NATS_URL and create their own databases and subject prefixes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/deepnode}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '==> %s\n' "$*"; }

# One line of context for a build that dies in the linker (a full disk shows up as SIGBUS in ld).
step "disk: $(df -h . | awk 'NR==2 {print $4 " free on " $6}')"

step "services: scripts/dev-services.sh up"
scripts/dev-services.sh up

step "format: cargo fmt --all --check"
cargo fmt --all --check

step "lint: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "architecture: deepnode-domain must not depend on tokio, sqlx or async-nats"
domain_deps=$(cargo tree -p deepnode-domain -e normal)
if offenders=$(grep -E 'tokio|sqlx|async-nats' <<<"$domain_deps"); then
    printf 'test.sh: architecture invariant broken: deepnode-domain depends on:\n%s\n' "$offenders" >&2
    exit 1
fi

if cargo nextest --version >/dev/null 2>&1; then
    # Doctests first, so that nextest's summary is the run's closing line.
    step "doctests: cargo test --workspace --doc"
    cargo test --workspace --doc
    step "tests: cargo nextest run --workspace"
    cargo nextest run --workspace
else
    step "tests: cargo test --workspace (cargo-nextest not installed)"
    cargo test --workspace
fi

step "all checks passed"
