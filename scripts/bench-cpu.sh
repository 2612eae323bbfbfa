#!/usr/bin/env bash
# CPU per write of each process, tern against Redis, under the same load: the
# Redis master (appendonly, appendfsync always) with one replica (also
# appendfsync always), and the tern master (binlog fsync=always, RESP front on)
# with one slave, both driven by the same redis-benchmark command line:
#
#   redis-benchmark -t set -d 100 -r 100000 -c 50 -P P -n N
#
# for each P in PIPELINES. For every process (master, replica/slave, the
# benchmark client) it prints the CPU time (user + system, from /proc/PID/stat
# and the shell's `times`) divided by the writes, and, when `perf` can count
# the syscalls:sys_enter_fdatasync tracepoint, the fdatasync calls per 1000
# writes. Redis and tern alternate (odd rounds Redis first), each round on fresh
# data directories. Where bench-vs-redis.sh says how fast, this says where the
# CPU goes: on a machine whose cores are all busy, CPU per write is the rate.
#
# Usage: scripts/bench-cpu.sh
#   env: ROUNDS=2 PIPELINES="1 16" CLIENTS=50
#        N_1=300000 N_16=2000000 (writes per load, per pipeline depth P: N_P;
#        default 300000 x P, at most 2000000)
#        TERN_BIN_DIR=DIR (tern-master, tern-slave, tern-bench copied aside,
#        instead of building)
# Progress goes to stderr; to stdout, a markdown table of the medians, then
# each round's figures. About 2 x ROUNDS x (10 s per load + 10 s of set-up).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
source "$ROOT/scripts/redis-side.sh"
ROUNDS="${ROUNDS:-2}"
PIPELINES="${PIPELINES:-1 16}"
CLIENTS="${CLIENTS:-50}"
KEYS=100000
VALUE_SIZE=100
say() { echo "[$(date +%T)] $*" >&2; }

declare -A WRITES # pipeline depth -> writes per load
for p in $PIPELINES; do
    [[ $p =~ ^[1-9][0-9]*$ ]] || { echo "PIPELINES: '$p' is not a positive integer" >&2; exit 1; }
    var="N_$p"
    WRITES[$p]="${!var:-$((300000 * p < 2000000 ? 300000 * p : 2000000))}"
    [[ ${WRITES[$p]} =~ ^[1-9][0-9]*$ ]] ||
        { echo "$var=${WRITES[$p]}: expected a positive integer" >&2; exit 1; }
done
for v in ROUNDS CLIENTS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "$v=${!v}: expected a positive integer" >&2; exit 1; }
done

ensure_redis
tern_binaries tern-master tern-slave tern-bench
# fdatasync counts need perf and a readable tracepoint.
FSYNC_COUNT=0
if command -v perf >/dev/null &&
    perf stat -e syscalls:sys_enter_fdatasync -o /dev/null true >/dev/null 2>&1; then
    FSYNC_COUNT=1
else
    say "perf cannot count syscalls:sys_enter_fdatasync here: no fsync columns"
fi

work_dir tern-cpu
free_ports 5
M_PORT=${PORTS[0]} R_PORT=${PORTS[1]} TM_GRPC=${PORTS[2]} TS_GRPC=${PORTS[3]} TM_RESP=${PORTS[4]}

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # utime + stime, clock ticks
HZ="$(getconf CLK_TCK)"

# Starts SYSTEM's master and replica/slave; sets MASTER_PID, REPLICA_PID, PORT
# (where redis-benchmark connects).
start() {
    local sys="$1" dir="$WORK/r$ROUND-$1"
    mkdir -p "$dir/m" "$dir/r"
    if [[ $sys == redis ]]; then
        redis-server --port "$M_PORT" --bind 127.0.0.1 --daemonize no --dir "$dir/m" \
            --appendonly yes --appendfsync always --save '' --logfile "$dir/m.log" &
        MASTER_PID=$!
        PIDS+=("$MASTER_PID")
        until_ok 30 "redis master" redis_up "$M_PORT"
        redis-server --port "$R_PORT" --bind 127.0.0.1 --daemonize no --dir "$dir/r" \
            --appendonly yes --appendfsync always --save '' --logfile "$dir/r.log" \
            --replicaof 127.0.0.1 "$M_PORT" &
        REPLICA_PID=$!
        PIDS+=("$REPLICA_PID")
        until_ok 30 "redis replica link" replica_linked "$R_PORT"
        PORT=$M_PORT
    else
        TERN__BINLOG__FSYNC=always TERN__SERVER__RESP_LISTEN="127.0.0.1:$TM_RESP" \
            "$BIN/tern-master" --listen "127.0.0.1:$TM_GRPC" --data-dir "$dir/m" >"$dir/m.log" 2>&1 &
        MASTER_PID=$!
        PIDS+=("$MASTER_PID")
        "$BIN/tern-bench" wait --target "http://127.0.0.1:$TM_GRPC" --timeout 60s >&2
        TERN__BINLOG__FSYNC=always "$BIN/tern-slave" --listen "127.0.0.1:$TS_GRPC" \
            --data-dir "$dir/r" --master "http://127.0.0.1:$TM_GRPC" >"$dir/r.log" 2>&1 &
        REPLICA_PID=$!
        PIDS+=("$REPLICA_PID")
        "$BIN/tern-bench" wait --target "http://127.0.0.1:$TS_GRPC" --timeout 60s >&2
        until_ok 30 "tern RESP front" redis_up "$TM_RESP"
        PORT=$TM_RESP
    fi
}
stop_all() {
    local p
    for p in "$MASTER_PID" "$REPLICA_PID"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "$MASTER_PID" "$REPLICA_PID"; do wait "$p" 2>/dev/null || true; done
}

# per_1000 PERF_STAT_OUTPUT N: fdatasync calls per 1000 of N writes, or "-".
per_1000() {
    [[ -s $1 ]] || { echo -; return; }
    awk -F, -v n="$2" '/sys_enter_fdatasync/ && $1 ~ /^[0-9]+$/ { v = sprintf("%.1f", $1 * 1000 / n) }
        END { print (v == "" ? "-" : v) }' "$1"
}

# measure SYSTEM P N: one load; appends a line to $WORK/results:
# round system P writes/s master replica client (µs CPU per write) master_fsyncs replica_fsyncs (per 1000 writes, or -)
measure() {
    local sys="$1" p="$2" n="$3" m0 r0 m1 r1 out cpu pm="$WORK/perf-m" pr="$WORK/perf-r" perf_pids=()
    redis-benchmark -h 127.0.0.1 -p "$PORT" -t set -d "$VALUE_SIZE" -r "$KEYS" \
        -c "$CLIENTS" -P "$p" -n $((n / 10)) -q >/dev/null 2>&1 # warm-up
    rm -f "$pm" "$pr"
    if ((FSYNC_COUNT)); then
        perf stat -e syscalls:sys_enter_fdatasync -x, -o "$pm" -p "$MASTER_PID" &
        perf_pids+=($!)
        perf stat -e syscalls:sys_enter_fdatasync -x, -o "$pr" -p "$REPLICA_PID" &
        perf_pids+=($!)
        sleep 0.3
    fi
    m0="$(ticks "$MASTER_PID")" r0="$(ticks "$REPLICA_PID")"
    # The subshell's `times` second line: its children's CPU (the benchmark).
    out="$(
        redis-benchmark -h 127.0.0.1 -p "$PORT" -t set -d "$VALUE_SIZE" -r "$KEYS" \
            -c "$CLIENTS" -P "$p" -n "$n" --csv 2>/dev/null | tail -n 1
        times
    )"
    m1="$(ticks "$MASTER_PID")" r1="$(ticks "$REPLICA_PID")"
    if ((FSYNC_COUNT)); then
        kill -INT "${perf_pids[@]}" 2>/dev/null || true
        wait "${perf_pids[@]}" 2>/dev/null || true
    fi
    local rps fm="-" fr="-"
    rps="$(sed -n 1p <<<"$out" | cut -d, -f2 | tr -d '"')"
    cpu="$(sed -n 3p <<<"$out" | awk '{
        s = 0
        for (i = 1; i <= 2; i++) { t = $i; m = t; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", t); sub(/s$/, "", t); s += m * 60 + t }
        print s }')"
    if ((FSYNC_COUNT)); then
        fm="$(per_1000 "$pm" "$n")" fr="$(per_1000 "$pr" "$n")"
    fi
    awk -v round="$ROUND" -v sys="$sys" -v p="$p" -v rps="$rps" -v n="$n" -v hz="$HZ" \
        -v m=$((m1 - m0)) -v r=$((r1 - r0)) -v c="$cpu" -v fm="${fm:--}" -v fr="${fr:--}" 'BEGIN {
        printf "%s %s %s %.0f %.2f %.2f %.2f %s %s\n", round, sys, p, rps,
            m / hz * 1e6 / n, r / hz * 1e6 / n, c * 1e6 / n, fm, fr }' >>"$WORK/results"
    say "  $sys -P $p: $(tail -n 1 "$WORK/results" | cut -d' ' -f4-)"
}

: >"$WORK/results"
echo "# CPU per write, tern against Redis: $(date -u '+%Y-%m-%d %H:%M') UTC"
echo
echo "redis-benchmark -t set -d $VALUE_SIZE -r $KEYS -c $CLIENTS -P P on each master;"
echo "Redis $(redis-server --version | awk '{ print $3 }' | sed 's/v=//'), tern $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    if ((ROUND % 2)); then order=(redis tern); else order=(tern redis); fi
    for sys in "${order[@]}"; do
        say "round $ROUND: $sys"
        start "$sys"
        for p in $PIPELINES; do
            measure "$sys" "$p" "${WRITES[$p]}"
        done
        stop_all
    done
done

# Medians over the rounds, per system and pipeline depth.
echo
echo "µs of CPU per write (user + system) and fdatasync calls per 1000 writes;"
echo "medians of $ROUNDS rounds (tern/Redis: ratio of the medians)."
echo
echo "| -P | process | Redis µs/write | tern µs/write | tern/Redis |"
echo "|---:|---|---:|---:|---:|"
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -v s="$1" -v p="$2" -v c="$3" '$2 == s && $3 == p && $c != "-" { print $c }' "$WORK/results" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || a == 0) print "-"; else printf "%.2f", b / a }'; }
for p in $PIPELINES; do
    for row in "writes/s:4" "master:5" "replica / slave:6" "redis-benchmark:7" "master fdatasync per 1000 writes:8" "replica / slave fdatasync per 1000 writes:9"; do
        name="${row%%:*}" c="${row##*:}"
        r="$(col redis "$p" "$c")" t="$(col tern "$p" "$c")"
        echo "| $p | $name | $r | $t | $(ratio "$r" "$t") |"
    done
done
echo
echo "Per round: round system P writes/s master replica client (µs/write) fsyncs/1000 (master replica)"
echo
echo '```'
cat "$WORK/results"
echo '```'
