#!/usr/bin/env bash
# Master memory benchmark, in one run on this machine: a master (default
# config: fsync=always) with SIZE_MB of data and SLAVES slaves attached;
#   1. fill:   fill the master with SIZE_MB of incompressible 64 KiB values;
#   2. sync:   start SLAVES empty slaves at once (each full-syncs: DbSync of a
#              RocksDB checkpoint, then streams the binlog) and wait until all
#              are synced;
#   3. stream: a Put load on the master for DURATION while every slave streams;
#   4. stall:  every slave frozen (SIGSTOP) while the master writes STALL of
#              16 KiB values, then resumed (slaves that stop reading);
# then stop the load, wait until every slave has caught up and compare every
# slave's Admin.Checksum digest with the master's.
# The master's VmRSS and VmHWM (and the slaves' VmRSS) are sampled from
# /proc/PID/status every 200 ms across all phases.
# Usage: scripts/bench-memory.sh
#   (env: SIZE_MB=1024 SLAVES=10 DURATION=20s STALL=10s CONCURRENCY=50 VALUE_SIZE=1024
#         BIN=<dir with tern-master, tern-slave, tern-bench> (default: build them)
#         KEEP=1 keeps the work dir, MASTER_WRAP="valgrind --tool=massif ..."
#         runs the master under a wrapper that execs it in the same process)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
SIZE_MB="${SIZE_MB:-1024}"
SLAVES="${SLAVES:-10}"
DURATION="${DURATION:-20s}"
STALL="${STALL:-10s}"
CONCURRENCY="${CONCURRENCY:-50}"
VALUE_SIZE="${VALUE_SIZE:-1024}"
MASTER_WRAP="${MASTER_WRAP:-}"
if [[ -z "${BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --bins --quiet)
    BIN="$CARGO_TARGET_DIR/debug"
fi
WORK="$(mktemp -d -t tern-bench-memory.XXXXXX)"
# A free range of ports: the master's, then one per slave.
while :; do
    MP=$((20000 + RANDOM % 20000))
    [[ -z "$(ss -Htln "sport >= :$MP and sport <= :$((MP + SLAVES))")" ]] && break
done
MASTER=""
SAMPLER=""
LOAD=""
SLAVE_PIDS=()
cleanup() {
    [[ -n "$SAMPLER" ]] && kill -TERM "$SAMPLER" 2>/dev/null
    [[ -n "$LOAD" ]] && kill -TERM "$LOAD" 2>/dev/null
    for p in "${SLAVE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    [[ -n "$MASTER" ]] && kill -TERM "$MASTER" 2>/dev/null
    wait 2>/dev/null
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "work dir kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Reads /proc/PID/status into ST_RSS, ST_HWM, ST_ANON, ST_FILE (kB; 0 when
# the process is gone). Bash builtins only: the sampler forks nothing.
read_status() {
    ST_RSS=0 ST_HWM=0 ST_ANON=0 ST_FILE=0
    local k v _
    [[ -r "/proc/$1/status" ]] || return 0
    while read -r k v _; do
        case "$k" in
            VmRSS:) ST_RSS=$v ;;
            VmHWM:) ST_HWM=$v ;;
            RssAnon:) ST_ANON=$v ;;
            RssFile:) ST_FILE=$v ;;
        esac
    done <"/proc/$1/status" 2>/dev/null || true
}

echo fill >"$WORK/phase"
# One line per 200 ms: phase, master VmRSS, VmHWM, RssAnon, RssFile, the
# slaves' summed VmRSS, the largest slave VmRSS (kB).
sampler() {
    local phase rss hwm anon file sum max p
    while :; do
        phase="$(<"$WORK/phase")"
        read_status "$MASTER"
        rss=$ST_RSS hwm=$ST_HWM anon=$ST_ANON file=$ST_FILE sum=0 max=0
        if [[ -f "$WORK/slave.pids" ]]; then
            while read -r p; do
                read_status "$p"
                sum=$((sum + ST_RSS))
                ((ST_RSS > max)) && max=$ST_RSS
            done <"$WORK/slave.pids"
        fi
        echo "$phase $rss $hwm $anon $file $sum $max" >>"$WORK/samples"
        sleep 0.2
    done
}

$MASTER_WRAP "$BIN/tern-master" --listen "127.0.0.1:$MP" --data-dir "$WORK/master" >"$WORK/master.log" 2>&1 &
MASTER=$!
sampler &
SAMPLER=$!
"$BIN/tern-bench" wait --target "http://127.0.0.1:$MP" --timeout 600s >&2
KEYS=$((SIZE_MB * 1048576 / 65536))
echo "fill: ~${SIZE_MB} MiB ($KEYS keys of 64 KiB) into the master (fsync=always)..." >&2
T0=$(date +%s.%N)
"$BIN/tern-bench" fill --target "http://127.0.0.1:$MP" --keys "$KEYS" --value-size 65536 >&2
T1=$(date +%s.%N)
DB_BYTES=$(du -sb "$WORK/master/db" | cut -f1)

echo sync >"$WORK/phase"
echo "sync: starting $SLAVES empty slaves (full sync each)..." >&2
for i in $(seq 1 "$SLAVES"); do
    "$BIN/tern-slave" --listen "127.0.0.1:$((MP + i))" --data-dir "$WORK/slave$i" \
        --master "http://127.0.0.1:$MP" >"$WORK/slave$i.log" 2>&1 &
    SLAVE_PIDS+=($!)
    echo $! >>"$WORK/slave.pids"
done
for i in $(seq 1 "$SLAVES"); do
    "$BIN/tern-bench" wait-synced --master "http://127.0.0.1:$MP" --slave "http://127.0.0.1:$((MP + i))" >&2
done
T2=$(date +%s.%N)

echo stream >"$WORK/phase"
echo "stream: Put load ($CONCURRENCY in flight, ${VALUE_SIZE}-byte values) for $DURATION while $SLAVES slaves stream..." >&2
"$BIN/tern-bench" kv --target "http://127.0.0.1:$MP" --concurrency "$CONCURRENCY" \
    --duration "$DURATION" --value-size "$VALUE_SIZE" --mix put=100 --json >"$WORK/load.json" &
LOAD=$!
wait "$LOAD"
LOAD=""
echo "load: $(cat "$WORK/load.json")" >&2
# Slaves that stop reading: every slave frozen (SIGSTOP) while the master
# writes STALL of 16 KiB values, then resumed; what the master holds for
# them is bounded by sync.window_bytes per slave.
echo stall >"$WORK/phase"
echo "stall: $SLAVES slaves frozen while the master writes 16 KiB values for $STALL, then resumed..." >&2
for p in "${SLAVE_PIDS[@]}"; do kill -STOP "$p"; done
"$BIN/tern-bench" kv --target "http://127.0.0.1:$MP" --concurrency "$CONCURRENCY" \
    --duration "$STALL" --value-size 16384 --mix put=100 >&2
for p in "${SLAVE_PIDS[@]}"; do kill -CONT "$p"; done
echo verify >"$WORK/phase"
echo "verify: waiting until every slave has caught up, then comparing Admin.Checksum digests..." >&2
for i in $(seq 1 "$SLAVES"); do
    "$BIN/tern-bench" wait-synced --master "http://127.0.0.1:$MP" --slave "http://127.0.0.1:$((MP + i))" >&2
done
digest() { grpcurl -plaintext "$1" tern.admin.v1.Admin/Checksum | sed -n 's/.*"digest": *"\([0-9a-f]*\)".*/\1/p'; }
MSUM="$(digest "127.0.0.1:$MP")"
SAME=0
for i in $(seq 1 "$SLAVES"); do
    [[ -n "$MSUM" && "$(digest "127.0.0.1:$((MP + i))")" == "$MSUM" ]] && SAME=$((SAME + 1))
done
sleep 0.5
kill -TERM "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true
SAMPLER=""
SLAVE_DB_BYTES=$(du -sb "$WORK/slave1/db" | cut -f1)
END_DB_BYTES=$(du -sb "$WORK/master/db" | cut -f1)
BINLOG_BYTES=$(du -sb "$WORK/master/binlog" | cut -f1)

awk -v db="$DB_BYTES" -v edb="$END_DB_BYTES" -v blog="$BINLOG_BYTES" -v sdb="$SLAVE_DB_BYTES" -v slaves="$SLAVES" -v same="$SAME" \
    -v tfill="$(awk -v a="$T0" -v b="$T1" 'BEGIN { print b - a }')" \
    -v tsync="$(awk -v a="$T1" -v b="$T2" 'BEGIN { print b - a }')" \
    -v ops="$(sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p' "$WORK/load.json")" '
function mib(kb) { return sprintf("%.0f", kb / 1024) }
$2 > 0 {
    p = $1
    if (!(p in n)) order[++np] = p
    n[p]++
    if ($2 > peak[p]) { peak[p] = $2; panon[p] = $4; pfile[p] = $5 }
    last[p] = $2; hwm[p] = $3; ssum[p] = $6
    if ($7 > smax[p]) smax[p] = $7
}
END {
    printf "| phase | master peak RSS (anon + file) | master final RSS | master VmHWM at end | slaves final RSS (sum) | largest slave peak RSS | samples |\n"
    printf "|---|---:|---:|---:|---:|---:|---:|\n"
    for (i = 1; i <= np; i++) {
        p = order[i]
        printf "| %s | %s MiB (%s + %s) | %s MiB | %s MiB | %s MiB | %s MiB | %d |\n", p, mib(peak[p]), mib(panon[p]), mib(pfile[p]), mib(last[p]), mib(hwm[p]), mib(ssum[p]), mib(smax[p]), n[p]
    }
    printf "\n| figure | value |\n|---|---:|\n"
    printf "| master RocksDB dir after fill (du; the memtable is not in it yet) | %.0f MiB |\n", db / 1048576
    printf "| master RocksDB dir at end (du) | %.0f MiB |\n", edb / 1048576
    printf "| master binlog dir at end (du) | %.0f MiB |\n", blog / 1048576
    printf "| slave RocksDB dir at end (du, slave 1) | %.0f MiB |\n", sdb / 1048576
    printf "| fill time | %.1f s |\n", tfill
    printf "| %d full syncs, start to all synced | %.1f s |\n", slaves, tsync
    printf "| Put load on the master while streaming | %s ops/s |\n", ops
    printf "| slaves whose checksum equals the master'"'"'s | %d / %d |\n", same, slaves
}' "$WORK/samples"
[[ "$SAME" == "$SLAVES" ]]
