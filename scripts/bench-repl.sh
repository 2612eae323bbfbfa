#!/usr/bin/env bash
# Replication benchmark, in one run on this machine: a master (fsync=always) and
# a slave on localhost;
#   1. the master's maximum Put throughput with the slave attached (tern-bench kv);
#   2. replication lag at half that rate (tern-bench repl: master ack -> slave applied);
#   3. catch-up: the slave frozen while the master writes flat out, then resumed.
# Usage: scripts/bench-repl.sh   (env: DURATION=10s CONCURRENCY=64 CATCHUP=5s)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
DURATION="${DURATION:-10s}"
CONCURRENCY="${CONCURRENCY:-64}"
CATCHUP="${CATCHUP:-5s}"
(cd "$ROOT" && cargo build --bins --quiet)
BIN="$CARGO_TARGET_DIR/debug"
WORK="$(mktemp -d -t tern-bench-repl.XXXXXX)"
MP=$((20000 + RANDOM % 20000)); SP=$((MP + 1))
"$BIN/tern-master" --listen "127.0.0.1:$MP" --data-dir "$WORK/master" >"$WORK/master.log" 2>&1 &
MASTER=$!
"$BIN/tern-slave" --listen "127.0.0.1:$SP" --data-dir "$WORK/slave" --master "http://127.0.0.1:$MP" >"$WORK/slave.log" 2>&1 &
SLAVE=$!
trap 'kill -CONT $SLAVE 2>/dev/null; kill -TERM $SLAVE $MASTER 2>/dev/null; wait; rm -rf "$WORK"' EXIT
"$BIN/tern-bench" wait --target "http://127.0.0.1:$MP" >&2
"$BIN/tern-bench" wait --target "http://127.0.0.1:$SP" >&2
MAX="$("$BIN/tern-bench" kv --target "http://127.0.0.1:$MP" --concurrency "$CONCURRENCY" --duration "$DURATION" --mix put=100 --json)"
echo "max: $MAX" >&2
RATE="$(sed -n 's/.*"ops_per_sec":\([0-9]*\).*/\1/p' <<<"$MAX")"
HALF=$((RATE / 2))
echo "lag at $HALF puts/s (half of $RATE) and catch-up..." >&2
"$BIN/tern-bench" repl --master "http://127.0.0.1:$MP" --slave "http://127.0.0.1:$SP" \
    --slave-pid "$SLAVE" --rate "$HALF" --concurrency "$CONCURRENCY" --duration "$DURATION" \
    --catchup "$CATCHUP"
echo "master max throughput with a slave attached: $RATE puts/s"
grpcurl -plaintext "127.0.0.1:$SP" tern.admin.v1.Admin/Info | grep -E '"(duplicatesSkipped|reconnects)"' || echo "duplicates_skipped: 0, reconnects: 0"
