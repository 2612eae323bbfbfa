#!/usr/bin/env bash
# tern against Redis 7.0, in one run on this machine, both durable and
# replicated: Redis master (appendonly, appendfsync always) + one replica (also
# appendfsync always); tern master (binlog fsync=always) + one slave. Clients run
# on the same machine. The machine is shared and noisy, so every row runs Redis
# and tern back to back, in ROUNDS rounds (odd rounds Redis first, even rounds
# tern first), each round on fresh data directories; ratios are tern/Redis per
# round, and the summary gives their median.
#
# Rows (100-byte values, keys drawn from 100000):
#   a. 50 clients, one write per request (Redis: redis-benchmark -t set -c 50,
#      one TCP connection per client; tern: tern-bench kv --concurrency 50 over
#      CONNECTIONS gRPC connections, with TERN_KV_FLAGS, by default
#      `--pipeline 1` when tern-bench has it, else unary calls);
#   b. 1 client, one write per request (ops/s and p50);
#   c. 50 clients, 16 writes per request (Redis -P 16; tern a Txn of 16 puts,
#      and, when tern-bench has --pipeline, 16 puts in flight per stream);
#   d. row a on the master alone (run before the replica/slave is started),
#      and with/without replica;
#   e. replication lag at half of that system's row-a rate, and with the master
#      saturated (rate = 10 x row a): tern-bench repl for tern (its writers on
#      Kv.Pipeline streams, as in row a), redis-lag for Redis (master ack ->
#      replica/slave read sees the write);
#   f. 1 client, write + wait for 1 replica (semi-synchronous): Redis SET then
#      WAIT 1 0 per write (redis-lag --wait-replicas 1); tern Put with
#      min_replicas=1 (tern-bench kv --min-replicas 1, with TERN_KV_FLAGS as
#      row b); p50 and p99;
#   g. redis-benchmark against both, the same command line for each: Redis, and
#      tern's RESP front (server.resp_listen on the tern master):
#      `redis-benchmark -t set -d 100 -r 100000 -c 50 -n N`, with -P 16, and
#      with -c 1 (row b with the same client on both) (N sized from probes to
#      last about DURATION, as for Redis in rows a-c).
#
# Usage: scripts/bench-vs-redis.sh
#   env: DURATION=10s (per run) ROUNDS=2 CONNECTIONS=8 CLIENT_THREADS=1 TERN_KV_FLAGS="--pipeline 1"
#        ROWS=a,b,c,d,e,f,g (rows to run; e needs a and runs it too; g needs
#        tern binaries with the RESP front)
#        TERN_BIN_DIR=DIR (use the tern-* and redis-lag binaries in DIR, copied
#        aside, instead of building: a build in the shared target directory
#        cannot change them mid-run)
# Progress goes to stderr; markdown tables (one per round, then the summary) to
# stdout. Takes about 35 x DURATION plus set-up (~7 minutes at 10s).
set -euo pipefail
# Rows asked for (read before ROWS is reused for the table below).
SELECT=",${ROWS:-a,b,c,d,e,f,g},"
[[ $SELECT != *,e,* ]] || SELECT="$SELECT,a,"
want() { [[ $SELECT == *",$1,"* ]]; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
source "$ROOT/scripts/redis-side.sh"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-2}"
CONNECTIONS="${CONNECTIONS:-8}"
CLIENTS=50
VALUE_SIZE=100
KEYS=100000
say() { echo "[$(date +%T)] $*" >&2; }

# Duration in seconds (10s, 500ms, 2m).
DUR_SECS="$(awk -v d="$DURATION" 'BEGIN {
    n = d + 0; u = d; sub(/^[0-9.]+/, "", u)
    if (u == "ms") n /= 1000; else if (u == "m") n *= 60; else if (u != "s" && u != "") n = -1
    print n }')"
if ! awk -v n="$DUR_SECS" 'BEGIN { exit !(n > 0) }'; then
    echo "DURATION=$DURATION: expected e.g. 10s, 500ms, 2m" >&2
    exit 1
fi

ensure_redis

tern_binaries tern-master tern-slave tern-bench redis-lag

# tern-bench kv --pipeline (a newer flag): one Kv.Pipeline stream per client.
if "$BIN/tern-bench" kv --help | grep -q -- --pipeline; then
    HAS_PIPELINE=1
    TERN_KV_FLAGS="${TERN_KV_FLAGS---pipeline 1}"
else
    HAS_PIPELINE=0
    TERN_KV_FLAGS="${TERN_KV_FLAGS-}"
fi
read -r -a KV_FLAGS <<<"$TERN_KV_FLAGS"
# Client threads of tern-bench kv: 1 (all clients on one thread, as
# redis-benchmark runs its clients on one event loop) when it has --threads.
CLIENT_THREADS="${CLIENT_THREADS:-1}"
THREAD_FLAGS=()
if "$BIN/tern-bench" kv --help | grep -q -- --threads; then
    THREAD_FLAGS=(--threads "$CLIENT_THREADS")
fi
# tern-bench repl --pipeline (a newer flag): the lag writers use Kv.Pipeline
# streams like row a, so "saturated" loads both systems as hard as row a does.
REPL_FLAGS=()
if "$BIN/tern-bench" repl --help | grep -q -- --pipeline; then REPL_FLAGS=(--pipeline); fi
if [[ -n "$TERN_KV_FLAGS" ]]; then TERN_MODE="tern-bench kv $TERN_KV_FLAGS"; else TERN_MODE="unary Kv.Put calls"; fi
[[ $HAS_PIPELINE -eq 1 ]] || TERN_MODE="$TERN_MODE (this tern-bench has no --pipeline)"
say "tern mode: $TERN_MODE"

work_dir tern-vs-redis

# Five distinct free ports, reused by every round.
free_ports 5
RM_PORT=${PORTS[0]} RR_PORT=${PORTS[1]} TM_PORT=${PORTS[2]} TS_PORT=${PORTS[3]}
TM_RESP=${PORTS[4]} # the tern master's RESP front (row g)
TM_URL="http://127.0.0.1:$TM_PORT" TS_URL="http://127.0.0.1:$TS_PORT"

stop() { # stop PID: SIGTERM and reap
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# redis_start ROLE PORT [--replicaof HOST PORT]: sets LAST_PID.
redis_start() {
    local role="$1" port="$2" dir="$WORK/r$ROUND-redis-$1"; shift 2
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize no --dir "$dir" \
        --appendonly yes --appendfsync always --save '' --repl-diskless-sync-delay 0 \
        --logfile "$dir.log" "$@" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    until_ok 30 "redis $role on $port" redis_up "$port"
}

# tern_start ROLE PORT [--master URL]: sets LAST_PID. With row g, the master
# also serves RESP on TM_RESP.
tern_start() {
    local role="$1" port="$2" dir="$WORK/r$ROUND-tern-$1" resp=(); shift 2
    if [[ $role == master ]] && want g; then resp=("TERN__SERVER__RESP_LISTEN=127.0.0.1:$TM_RESP"); fi
    env TERN__BINLOG__FSYNC=always "${resp[@]}" "$BIN/tern-$role" --listen "127.0.0.1:$port" \
        --data-dir "$dir" "$@" >"$dir.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    "$BIN/tern-bench" wait --target "http://127.0.0.1:$port" --timeout 60s >&2 ||
        { tail -n 20 "$dir.log" >&2; exit 1; }
    if ((${#resp[@]})); then until_ok 30 "tern RESP on $TM_RESP" redis_up "$TM_RESP"; fi
}

# redis_bench CLIENTS PIPELINE [PORT]: redis-benchmark SET (on the Redis master,
# or PORT) for about DURATION, its -n sized from probes (x4 requests until one lasts 0.5 s: a short burst of
# fsync=always writes runs much faster than the sustained rate); prints
# "ops_per_sec p50_us".
redis_bench() {
    local c="$1" p="$2" port="${3:-$RM_PORT}" probe rps n
    probe=$(((c * p * 20) > 500 ? c * p * 20 : 500))
    while :; do
        rps="$(redis_bench_n "$c" "$p" "$probe" "$port" | cut -d' ' -f1)"
        awk -v n="$probe" -v r="$rps" 'BEGIN { exit !(n < 0.5 * r && n < 10000000) }' || break
        probe=$((probe * 4))
    done
    n="$(awk -v r="$rps" -v s="$DUR_SECS" 'BEGIN { n = int(r * s); print (n < 1000 ? 1000 : n) }')"
    say "  redis-benchmark -p $port -c $c -P $p -n $n (probe: $rps req/s)"
    redis_bench_n "$c" "$p" "$n" "$port"
}
redis_bench_n() { # CLIENTS PIPELINE REQUESTS [PORT]
    redis-benchmark -h 127.0.0.1 -p "${4:-$RM_PORT}" -t set -d "$VALUE_SIZE" -r "$KEYS" \
        -c "$1" -P "$2" -n "$3" --csv |
        awk -F'"' '$2 == "SET" { printf "%.1f %.0f\n", $4, $10 * 1000; found = 1 }
            END { exit !found }'
}

# tern_bench ARGS...: tern-bench kv on the master; prints
# "ops_per_sec p50_us puts_per_sec p99_us".
tern_bench() {
    local out
    say "  tern-bench kv $*"
    out="$("$BIN/tern-bench" kv --target "$TM_URL" --duration "$DURATION" \
        --value-size "$VALUE_SIZE" --keys "$KEYS" --json "${THREAD_FLAGS[@]}" "$@")"
    if ! grep -q '"errors":{}' <<<"$out"; then say "  tern-bench kv reported errors: $out"; fi
    printf '%s %s %s %s\n' "$(jfield "$out" ops_per_sec)" "$(jfield "$out" p50_us)" \
        "$(jfield "$out" puts_per_sec)" "$(jfield "$out" p99_us)"
}
jfield() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }

# lag_fields JSON: "write_rate lag_p50_us lag_p99_us lag_max_us lag_errors".
lag_fields() {
    local f out=""
    for f in write_rate lag_p50_us lag_p99_us lag_max_us lag_errors; do
        out+="$(jfield "$1" "$f") "
    done
    echo "${out% }"
}
redis_lag() { # RATE
    say "  redis-lag --rate $1"
    lag_fields "$("$BIN/redis-lag" --master "127.0.0.1:$RM_PORT" --replica "127.0.0.1:$RR_PORT" \
        --rate "$1" --concurrency "$CLIENTS" --duration "$DURATION" --value-size "$VALUE_SIZE" \
        --keys "$KEYS" --json)"
}
tern_lag() { # RATE
    say "  tern-bench repl --rate $1"
    lag_fields "$("$BIN/tern-bench" repl --master "$TM_URL" --slave "$TS_URL" --rate "$1" \
        --concurrency "$CLIENTS" --duration "$DURATION" --value-size "$VALUE_SIZE" \
        --keys "$KEYS" --catchup 1s "${REPL_FLAGS[@]}" --json)"
}

# Results: V[system:round:metric] (system R or T).
declare -A V
put() { V["$1:$ROUND:$2"]="$3"; }
# both METRIC... : runs row functions redis_row / tern_row in this round's order.
run_both() { # run_both FUNCTION (called as FUNCTION R, FUNCTION T)
    if ((ROUND % 2)); then "$1" R; "$1" T; else "$1" T; "$1" R; fi
}

# SYSTEM: CLIENTS clients, one write per request; prints "ops_per_sec p50_us".
one_write_each() {
    if [[ $1 == R ]]; then
        redis_bench "$CLIENTS" 1
    else
        tern_bench --concurrency "$CLIENTS" --connections "$CONNECTIONS" --mix put=100 "${KV_FLAGS[@]}"
    fi
}
row_alone() { # d: the master without replica
    local r
    r=($(one_write_each "$1"))
    put "$1" alone "${r[0]}"
}
row_a() {
    local r
    r=($(one_write_each "$1"))
    put "$1" a_ops "${r[0]}"
    put "$1" a_p50 "${r[1]}"
    put "$1" with_without "$(awk -v a="${r[0]}" -v b="${V[$1:$ROUND:alone]:-}" \
        'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
}
row_b() {
    local r
    if [[ $1 == R ]]; then
        r=($(redis_bench 1 1))
    else
        r=($(tern_bench --concurrency 1 --connections 1 --mix put=100 "${KV_FLAGS[@]}"))
    fi
    put "$1" b_ops "${r[0]}"
    put "$1" b_p50 "${r[1]}"
}
row_c() {
    local r
    if [[ $1 == R ]]; then
        r=($(redis_bench "$CLIENTS" 16))
        put R c_txn "${r[0]}"
        put R c_pipe "${r[0]}"
    else
        r=($(tern_bench --concurrency "$CLIENTS" --connections "$CONNECTIONS" --mix txn=1 --txn-ops 16))
        put T c_txn "${r[2]}"
        if [[ $HAS_PIPELINE -eq 1 ]]; then
            r=($(tern_bench --concurrency "$CLIENTS" --connections "$CONNECTIONS" --mix put=100 --pipeline 16))
            put T c_pipe "${r[2]}"
        fi
    fi
}
# e: lag at half of this round's row-a rate, and saturated (10 x row a).
lag_row() { # lag_row SYSTEM NAME FACTOR
    local rate r
    rate="$(awk -v a="${V[$1:$ROUND:a_ops]}" -v f="$3" 'BEGIN { r = int(a * f); print (r < 1 ? 1 : r) }')"
    if [[ $1 == R ]]; then r=($(redis_lag "$rate")); else r=($(tern_lag "$rate")); fi
    put "$1" "${2}_target" "$rate"
    put "$1" "${2}_rate" "${r[0]}"
    put "$1" "${2}_p50" "${r[1]}"
    put "$1" "${2}_p99" "${r[2]}"
    put "$1" "${2}_max" "${r[3]}"
    put "$1" "${2}_err" "${r[4]}"
}
row_half() { lag_row "$1" half 0.5; }
row_sat() { lag_row "$1" sat 10; }
# f: one client, each write answered once one replica/slave holds it.
row_f() {
    local r out
    if [[ $1 == R ]]; then
        say "  redis-lag --wait-replicas 1 --concurrency 1"
        out="$("$BIN/redis-lag" --master "127.0.0.1:$RM_PORT" --wait-replicas 1 \
            --wait-timeout-ms 0 --concurrency 1 --duration "$DURATION" \
            --value-size "$VALUE_SIZE" --keys "$KEYS" --json)"
        if ! grep -q '"errors":0,"short":0' <<<"$out"; then say "  redis-lag reported errors: $out"; fi
        r=("$(jfield "$out" ops_per_sec)" "$(jfield "$out" p50_us)" "" "$(jfield "$out" p99_us)")
    else
        r=($(tern_bench --concurrency 1 --connections 1 --mix put=100 --min-replicas 1 \
            --replica-timeout-ms 10000 "${KV_FLAGS[@]}"))
    fi
    put "$1" f_ops "${r[0]}"
    put "$1" f_p50 "${r[1]}"
    put "$1" f_p99 "${r[3]}"
}

# g: the same redis-benchmark command lines against Redis and tern's RESP front.
row_g() {
    local port=$RM_PORT r
    [[ $1 == R ]] || port=$TM_RESP
    r=($(redis_bench "$CLIENTS" 1 "$port"))
    put "$1" g_ops "${r[0]}"
    put "$1" g_p50 "${r[1]}"
    r=($(redis_bench "$CLIENTS" 16 "$port"))
    put "$1" g_pipe "${r[0]}"
    r=($(redis_bench 1 1 "$port"))
    put "$1" g1_ops "${r[0]}"
    put "$1" g1_p50 "${r[1]}"
}

# Table rows: KEY|LABEL|UNIT (the ratio is tern/Redis of the two values).
ROWS=()
want a && ROWS+=(
    "a_ops|a. $CLIENTS clients, 1 write/request: writes/s|/s"
    "a_p50|a. $CLIENTS clients, 1 write/request: p50 us (lower is better)|us"
)
want b && ROWS+=(
    "b_ops|b. 1 client, 1 write/request: writes/s|/s"
    "b_p50|b. 1 client, 1 write/request: p50 us (lower is better)|us"
)
want c && ROWS+=("c_txn|c. $CLIENTS clients, 16 writes/request: writes/s (Redis -P 16; tern Txn of 16)|/s")
want c && [[ $HAS_PIPELINE -eq 1 ]] &&
    ROWS+=("c_pipe|c. $CLIENTS clients, 16 writes/request: writes/s (Redis -P 16; tern --pipeline 16)|/s")
want d && ROWS+=("alone|d. master alone ($CLIENTS clients, 1 write/request): writes/s|/s")
want d && want a && ROWS+=("with_without|d. with replica / alone (row a / row d)|x")
want e && ROWS+=(
    "half_target|e. lag at half rate: target writes/s (half of row a)|/s"
    "half_rate|e. lag at half rate: achieved writes/s|/s"
    "half_p50|e. lag at half rate: p50 us|us"
    "half_p99|e. lag at half rate: p99 us|us"
    "half_max|e. lag at half rate: max us|us"
    "half_err|e. lag at half rate: errors+timeouts|n"
    "sat_rate|e. lag, master saturated: achieved writes/s|/s"
    "sat_p50|e. lag, master saturated: p50 us|us"
    "sat_p99|e. lag, master saturated: p99 us|us"
    "sat_max|e. lag, master saturated: max us|us"
    "sat_err|e. lag, master saturated: errors+timeouts|n"
)
want f && ROWS+=(
    "f_ops|f. 1 client, write + wait for 1 replica: writes/s (Redis SET + WAIT 1 0; tern min_replicas=1)|/s"
    "f_p50|f. 1 client, write + wait for 1 replica: p50 us (lower is better)|us"
    "f_p99|f. 1 client, write + wait for 1 replica: p99 us (lower is better)|us"
)
want g && ROWS+=(
    "g_ops|g. redis-benchmark -t set -c $CLIENTS (RESP on both): writes/s|/s"
    "g_p50|g. redis-benchmark -t set -c $CLIENTS (RESP on both): p50 us (lower is better)|us"
    "g_pipe|g. redis-benchmark -t set -c $CLIENTS -P 16 (RESP on both): writes/s|/s"
    "g1_ops|g. redis-benchmark -t set -c 1 (RESP on both): writes/s|/s"
    "g1_p50|g. redis-benchmark -t set -c 1 (RESP on both): p50 us (lower is better)|us"
)
ratio() { awk -v t="$1" -v r="$2" 'BEGIN { if (r > 0 && t != "") printf "%.2f", t / r; else print "n/a" }'; }
median() { # values... (n/a and empty skipped)
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a";
            else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
fmt() { awk -v v="$1" 'BEGIN { if (v ~ /^[0-9.]+$/) { if (v == int(v) || v >= 100) printf "%.0f", v; else printf "%.2f", v } else print "n/a" }'; }

print_round() {
    local row key label
    echo
    echo "### Round $1 of $ROUNDS ($(if (($1 % 2)); then echo "Redis first"; else echo "tern first"; fi))"
    echo
    echo "| row | Redis | tern | tern/Redis |"
    echo "|---|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key label _ <<<"$row"
        printf '| %s | %s | %s | %s |\n' "$label" "$(fmt "${V[R:$1:$key]:-}")" \
            "$(fmt "${V[T:$1:$key]:-}")" "$(ratio "${V[T:$1:$key]:-}" "${V[R:$1:$key]:-}")"
    done
}

echo "# tern vs Redis: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "- machine: $(uname -n), $(nproc) cores; clients on the same machine"
echo "- $(redis-server --version)"
echo "- tern: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo " (+ uncommitted changes)")"
echo "- DURATION=$DURATION per run, $ROUNDS rounds; values $VALUE_SIZE B, keys from $KEYS"
echo "- Redis: appendonly yes, appendfsync always, one replica (also appendfsync always);"
echo "  redis-benchmark uses one TCP connection per client (50 clients = 50 connections)"
echo "- tern: binlog fsync=always, one slave; tern-bench kv: $CLIENTS clients over $CONNECTIONS"
echo "  gRPC connections (row b: 1 over 1); mode: $TERN_MODE; client threads: ${THREAD_FLAGS[1]:-tokio default}"
echo "- lag: tern-bench repl (Get with min_index on the slave, answered when applied) vs"
echo "  redis-lag (GET polled on the replica until it returns the value; back to back for"
echo "  1 ms, then 100 us apart); both $CLIENTS writer clients, one write in 10 sampled"
echo "- semi-sync (row f): redis-lag --wait-replicas 1 (SET then WAIT 1 0 on one connection) vs"
echo "  tern-bench kv --concurrency 1 --min-replicas 1 (mode as row b)"
echo "- RESP (row g): redis-benchmark -t set -d $VALUE_SIZE -r $KEYS -c $CLIENTS [-P 16] -n N, the same"
echo "  command line against Redis and against the tern master's RESP front (server.resp_listen)"
echo "- rows: ${SELECT//,/ }"

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    say "round $ROUND of $ROUNDS: masters alone"
    redis_start master "$RM_PORT"; RM_PID=$LAST_PID
    tern_start master "$TM_PORT"; TM_PID=$LAST_PID
    want d && run_both row_alone
    say "round $ROUND: starting the replica and the slave"
    redis_start replica "$RR_PORT" --replicaof 127.0.0.1 "$RM_PORT"; RR_PID=$LAST_PID
    until_ok 120 "redis replica link" replica_linked "$RR_PORT"
    tern_start slave "$TS_PORT" --master "$TM_URL"; TS_PID=$LAST_PID
    "$BIN/tern-bench" wait-synced --master "$TM_URL" --slave "$TS_URL" --timeout 120s >&2
    for row in a b c e f g; do
        want "$row" || continue
        if [[ $row == e ]]; then fns=(row_half row_sat); else fns=("row_$row"); fi
        for fn in "${fns[@]}"; do
            say "round $ROUND: $fn"
            run_both "$fn"
        done
    done
    for p in "$RR_PID" "$TS_PID" "$RM_PID" "$TM_PID"; do stop "$p"; done
    PIDS=()
    print_round "$ROUND"
done

echo
echo "### Summary: medians over $ROUNDS rounds"
echo
echo "| row | Redis | tern | tern/Redis per round | median tern/Redis |"
echo "|---|---:|---:|---|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r key label _ <<<"$row"
    rs=() ts=() qs=()
    for ((i = 1; i <= ROUNDS; i++)); do
        rs+=("${V[R:$i:$key]:-}")
        ts+=("${V[T:$i:$key]:-}")
        qs+=("$(ratio "${V[T:$i:$key]:-}" "${V[R:$i:$key]:-}")")
    done
    printf '| %s | %s | %s | %s | %s |\n' "$label" "$(fmt "$(median "${rs[@]}")")" \
        "$(fmt "$(median "${ts[@]}")")" "$(IFS=' '; echo "${qs[*]}")" "$(fmt "$(median "${qs[@]}")")"
done
