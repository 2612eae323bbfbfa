# Sourced by the other scripts: one build directory for everything.
# RocksDB's C++ build is the long pole (~20 min on 2 cores), so every script and
# CI share one target directory outside the clone, and one cargo profile (dev,
# with dependencies optimised: see Cargo.toml).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tern-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Features the test suite needs in the binaries it spawns.
export TERN_TEST_FEATURES="tern-slave/fault-injection"
