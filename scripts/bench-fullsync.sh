#!/usr/bin/env bash
# Full sync benchmark, in one run on this machine:
#   1. fill a master with SIZE_MB of data (64 KiB values, fsync=no to load fast);
#   2. copy its RocksDB files with cp (the baseline);
#   3. start an empty slave and time its full sync: until its link is connected
#      (the first incremental batch can flow) and its data equals the master's.
# Usage: scripts/bench-fullsync.sh   (env: SIZE_MB=1100)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
SIZE_MB="${SIZE_MB:-1100}"
(cd "$ROOT" && cargo build --bins --quiet)
BIN="$CARGO_TARGET_DIR/debug"
WORK="$(mktemp -d -t tern-bench-fullsync.XXXXXX)"
MP=$((20000 + RANDOM % 20000)); SP=$((MP + 1))
SLAVE=""
cleanup() {
    [[ -n "$SLAVE" ]] && kill -TERM "$SLAVE" 2>/dev/null
    kill -TERM "$MASTER" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$WORK"
}
TERN__BINLOG__FSYNC=no "$BIN/tern-master" --listen "127.0.0.1:$MP" --data-dir "$WORK/master" >"$WORK/master.log" 2>&1 &
MASTER=$!
trap cleanup EXIT
"$BIN/tern-bench" wait --target "http://127.0.0.1:$MP" >&2
KEYS=$((SIZE_MB * 16))   # 64 KiB values
echo "filling the master with ~${SIZE_MB} MiB ($KEYS keys of 64 KiB)..." >&2
"$BIN/tern-bench" fill --target "http://127.0.0.1:$MP" --keys "$KEYS" --value-size 65536 >&2
grpcurl -plaintext "127.0.0.1:$MP" tern.admin.v1.Admin/Checksum >"$WORK/master.sum"
# Stop the master for the copy (RocksDB compacts, and removes files, while it runs).
kill -TERM "$MASTER"; wait "$MASTER"
sync
DB_BYTES=$(du -sb "$WORK/master/db" | cut -f1)
echo "cp baseline ($((DB_BYTES >> 20)) MiB of RocksDB files)..." >&2
T0=$(date +%s.%N)
cp -r "$WORK/master/db" "$WORK/cp-copy"
sync -f "$WORK/cp-copy" 2>/dev/null || sync
T1=$(date +%s.%N)
rm -rf "$WORK/cp-copy"
TERN__BINLOG__FSYNC=no "$BIN/tern-master" --listen "127.0.0.1:$MP" --data-dir "$WORK/master" >>"$WORK/master.log" 2>&1 &
MASTER=$!
"$BIN/tern-bench" wait --target "http://127.0.0.1:$MP" >&2
echo "full sync of an empty slave..." >&2
T2=$(date +%s.%N)
"$BIN/tern-slave" --listen "127.0.0.1:$SP" --data-dir "$WORK/slave" --master "http://127.0.0.1:$MP" >"$WORK/slave.log" 2>&1 &
SLAVE=$!
"$BIN/tern-bench" wait-synced --master "http://127.0.0.1:$MP" --slave "http://127.0.0.1:$SP" >&2
T3=$(date +%s.%N)
grpcurl -plaintext "127.0.0.1:$SP" tern.admin.v1.Admin/Checksum >"$WORK/slave.sum"
cmp -s "$WORK/master.sum" "$WORK/slave.sum" && SAME=yes || SAME=NO
awk -v b="$DB_BYTES" -v t0="$T0" -v t1="$T1" -v t2="$T2" -v t3="$T3" -v same="$SAME" 'BEGIN {
    cp = t1 - t0; fs = t3 - t2; mb = b / 1048576;
    printf "| figure | value |\n|---|---:|\n";
    printf "| RocksDB files | %.0f MiB |\n", mb;
    printf "| cp -r + sync | %.2f s, %.0f MB/s |\n", cp, mb / cp;
    printf "| full sync, slave start to first incremental batch | %.2f s, %.0f MB/s |\n", fs, mb / fs;
    printf "| ratio full sync / cp | %.2f |\n", (mb / fs) / (mb / cp);
    printf "| checksums equal | %s |\n", same;
}'
