#!/usr/bin/env bash
# tern write throughput against the raw RocksDB baseline, in one run on this
# machine (numbers from different machines or runs are not comparable; the
# ratios are the point):
#
#   1. tern-master fsync=always  + tern-bench kv, put-only
#   2. tern-master fsync=no      + tern-bench kv, put-only
#   3. tern-bench raw --sync     (RocksDB WriteBatch of BATCH puts, WAL fsynced)
#   4. tern-bench raw            (same, WAL not fsynced)
#
# and prints a markdown table with the ratios (always / raw-sync, no / raw).
#
# Usage: scripts/bench.sh            (env: DURATION=10s CONCURRENCY=64 CONNECTIONS=8
#                                      VALUE_SIZE=100 KEYS=100000 BATCH=64
#                                      PORT=<default: a free one>
#                                      BENCH_DIR=<temp dir, default mktemp -d>)
# Uses the dev profile (its dependencies are built optimised); honours CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One target directory for every script (RocksDB is built once): see env.sh.
source "$ROOT/scripts/env.sh"
DURATION="${DURATION:-10s}"
CONCURRENCY="${CONCURRENCY:-64}"
CONNECTIONS="${CONNECTIONS:-8}"
VALUE_SIZE="${VALUE_SIZE:-100}"
KEYS="${KEYS:-100000}"
BATCH="${BATCH:-64}"

# A port nobody listens on (a benchmark against someone else's node would be
# silently wrong).
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -z "${PORT:-}" ]]; then
    PORT=$((20000 + RANDOM % 20000))
    while port_in_use "$PORT"; do PORT=$((PORT + 1)); done
elif port_in_use "$PORT"; then
    echo "port $PORT is already in use" >&2
    exit 1
fi

echo "building (cargo build --bins, dev profile)..." >&2
BUILD_LOG="$(mktemp -t tern-bench-build.XXXXXX)"
if ! (cd "$ROOT" && cargo build --bins --quiet 2>"$BUILD_LOG"); then
    cat "$BUILD_LOG" >&2
    exit 1
fi
rm -f "$BUILD_LOG"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
[[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
for b in tern-master tern-bench; do
    [[ -x "$BIN/$b" ]] || { echo "missing $BIN/$b" >&2; exit 1; }
done

WORK="${BENCH_DIR:-$(mktemp -d -t tern-bench.XXXXXX)}"
mkdir -p "$WORK"
MASTER_PID=""
cleanup() {
    if [[ -n "$MASTER_PID" ]] && kill -0 "$MASTER_PID" 2>/dev/null; then
        kill -TERM "$MASTER_PID" 2>/dev/null || true
        wait "$MASTER_PID" 2>/dev/null || true
    fi
    if [[ -z "${BENCH_DIR:-}" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# master_run FSYNC: starts a master with that fsync policy on a fresh data dir,
# runs the kv benchmark against it, stops it with SIGTERM; prints the JSON line.
master_run() {
    local fsync="$1" dir="$WORK/master-$1" log="$WORK/master-$1.log"
    rm -rf "$dir"
    TERN__BINLOG__FSYNC="$fsync" "$BIN/tern-master" \
        --listen "127.0.0.1:$PORT" --data-dir "$dir" >"$log" 2>&1 &
    MASTER_PID=$!
    if ! "$BIN/tern-bench" wait --target "http://127.0.0.1:$PORT" --timeout 60s >&2 ||
        ! kill -0 "$MASTER_PID" 2>/dev/null; then
        echo "master (fsync=$fsync) did not come up; log $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    echo "kv benchmark, master fsync=$fsync, $DURATION..." >&2
    "$BIN/tern-bench" kv --target "http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" \
        --connections "$CONNECTIONS" --duration "$DURATION" --value-size "$VALUE_SIZE" \
        --keys "$KEYS" --mix put=100 --json
    # The master's average group (transactions per binlog append + fsync), so the
    # raw baseline can also be run with the same batches.
    local info
    info="$(grpcurl -plaintext "127.0.0.1:$PORT" tern.admin.v1.Admin/Info)"
    awk -F'"' '/"transactionsCommitted"/ { t = $4 } /"commitGroups"/ { g = $4 }
        END { if (g > 0) printf "%d\n", (t / g) + 0.5; else print 1 }' <<<"$info" \
        >"$WORK/group-$fsync"
    kill -TERM "$MASTER_PID"
    local rc=0
    wait "$MASTER_PID" || rc=$?
    MASTER_PID=""
    if [[ $rc -ne 0 ]]; then
        echo "master (fsync=$fsync) exited with status $rc after SIGTERM; log $log" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
}

raw_run() { # raw_run NAME BATCH [--sync]
    local name="$1" batch="$2"; shift 2
    rm -rf "$WORK/$name"
    echo "raw RocksDB benchmark $name, batch $batch, $DURATION..." >&2
    "$BIN/tern-bench" raw --dir "$WORK/$name" --batch "$batch" --value-size "$VALUE_SIZE" \
        --keys "$KEYS" --duration "$DURATION" --json "$@"
}

ALWAYS="$(master_run always)"
GROUP="$(cat "$WORK/group-always")"
NOSYNC="$(master_run no)"
RAW_SYNC="$(raw_run raw-sync "$BATCH" --sync)"
RAW_SYNC_GROUP="$(raw_run raw-sync-group "$GROUP" --sync)"
RAW="$(raw_run raw-nosync "$BATCH")"

field() { # field JSON NAME
    sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"
}
errors() {
    sed -n 's/.*"errors":{\([^}]*\)}.*/\1/p' <<<"$1"
}
row() { # row NAME JSON
    local e; e="$(errors "$2")"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$(field "$2" puts_per_sec)" \
        "$(field "$2" p50_us)" "$(field "$2" p99_us)" "$(field "$2" p999_us)" \
        "$(field "$2" max_us)" "${e:-none}"
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

echo
echo "tern put throughput vs raw RocksDB: $(uname -n), $(nproc) cores, duration $DURATION,"
echo "value $VALUE_SIZE B, keys $KEYS; tern: $CONCURRENCY concurrent clients over $CONNECTIONS"
echo "connections; raw: one writer, batches of $BATCH puts. Latency: per request (tern) or"
echo "per batch (raw), microseconds."
echo
echo "| run | puts/s | p50 us | p99 us | p999 us | max us | errors |"
echo "|---|---:|---:|---:|---:|---:|---|"
row "tern master, fsync=always" "$ALWAYS"
row "tern master, fsync=no" "$NOSYNC"
row "raw RocksDB, WAL sync, batch $BATCH" "$RAW_SYNC"
row "raw RocksDB, WAL sync, batch $GROUP (= master's mean group)" "$RAW_SYNC_GROUP"
row "raw RocksDB, WAL no sync, batch $BATCH" "$RAW"
echo
echo "| ratio | value |"
echo "|---|---:|"
echo "| tern fsync=always / raw sync, batch $BATCH | $(ratio "$(field "$ALWAYS" puts_per_sec)" "$(field "$RAW_SYNC" puts_per_sec)") |"
echo "| tern fsync=always / raw sync, same batches ($GROUP) | $(ratio "$(field "$ALWAYS" puts_per_sec)" "$(field "$RAW_SYNC_GROUP" puts_per_sec)") |"
echo "| tern fsync=no / raw no sync | $(ratio "$(field "$NOSYNC" puts_per_sec)" "$(field "$RAW" puts_per_sec)") |"
