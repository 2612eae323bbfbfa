# Sourced by the scripts that run Redis next to tern (bench-vs-redis.sh,
# bench-cpu.sh), after env.sh: Redis from Debian when missing, tern's
# binaries, a work directory whose processes are stopped on exit, free
# ports, and readiness checks.

# Installs redis-server and redis-tools from Debian if any of their binaries
# is missing.
ensure_redis() {
    if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null ||
        ! command -v redis-cli >/dev/null; then
        echo "installing redis-server and redis-tools..." >&2
        local sudo=""
        [[ "$(id -u)" -eq 0 ]] || sudo=sudo
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >&2
    fi
}

# tern_binaries NAME...: sets BIN to the directory holding the binaries
# NAME...: TERN_BIN_DIR when set (binaries copied aside, not built), else
# the shared target directory after a build. Exits if one is missing.
tern_binaries() {
    if [[ -n "${TERN_BIN_DIR:-}" ]]; then
        BIN="$TERN_BIN_DIR"
        echo "binaries from $BIN (not built)" >&2
    else
        echo "building (cargo build --bins)..." >&2
        (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo build --bins --quiet)
        BIN="$CARGO_TARGET_DIR/debug"
    fi
    local b
    for b in "$@"; do
        [[ -x "$BIN/$b" ]] || { echo "missing $BIN/$b" >&2; exit 1; }
    done
}

# work_dir PREFIX: sets WORK (a new temporary directory) and PIDS (processes
# started, each appended by the caller); on exit every one of them gets
# SIGTERM and is reaped, and WORK is removed.
work_dir() {
    WORK="$(mktemp -d -t "$1.XXXXXX")"
    PIDS=()
    trap _work_cleanup EXIT
    trap 'exit 130' INT TERM
}
_work_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# free_ports N: sets PORTS to N distinct ports nothing listens on.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_ports() {
    local next=$((20000 + RANDOM % 20000))
    PORTS=()
    while [[ ${#PORTS[@]} -lt $1 ]]; do
        port_in_use "$next" || PORTS+=("$next")
        next=$((next + 1))
    done
}

# until_ok SECONDS WHAT CMD...: retries CMD every 0.1 s; exits the script
# when it never succeeds.
until_ok() {
    local secs="$1" what="$2" i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "$what: not ready after ${secs}s" >&2
    exit 1
}
redis_up() { [[ "$(redis-cli -p "$1" ping)" == PONG ]]; }
replica_linked() { redis-cli -p "$1" info replication | grep -q '^master_link_status:up'; }
