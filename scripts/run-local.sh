#!/usr/bin/env bash
# Builds tern and runs a master (127.0.0.1:7400) and a slave (127.0.0.1:7401)
# replicating on localhost, with data under ./data/. Ctrl-C stops both cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --bins
bin="$CARGO_TARGET_DIR/debug"
mkdir -p data
"$bin/tern-master" --listen 127.0.0.1:7400 --data-dir data/master &
master=$!
"$bin/tern-slave" --listen 127.0.0.1:7401 --data-dir data/slave --master http://127.0.0.1:7400 &
slave=$!
trap 'kill -TERM $slave $master 2>/dev/null; wait' INT TERM
echo "tern: master on 127.0.0.1:7400 (pid $master), slave on 127.0.0.1:7401 (pid $slave); Ctrl-C to stop" >&2
wait
