#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property tests and end-to-end
# tests over real tern-master / tern-slave processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features "$TERN_TEST_FEATURES" -- -D warnings
echo "== build binaries (target: $CARGO_TARGET_DIR)"
cargo build --workspace --bins --features "$TERN_TEST_FEATURES"
echo "== tests"
cargo nextest run --workspace --features "$TERN_TEST_FEATURES" --no-fail-fast "$@"
