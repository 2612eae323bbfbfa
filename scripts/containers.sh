#!/usr/bin/env bash
# Containers for tern with podman (Debian 12), without an image registry.
#
#   scripts/containers.sh install     podman, podman-compose, debootstrap, runc,
#                                     netavark, aardvark-dns, iptables, slirp4netns
#                                     (when missing)
#   scripts/containers.sh conf        write $TERN_CONTAINERS_DIR/containers.conf
#   scripts/containers.sh base-image  debian:bookworm-slim made locally with
#                                     debootstrap (skipped when it exists)
#   scripts/containers.sh stage DIR   a build context for the `prebuilt` target
#                                     of docker/Dockerfile: the binaries of
#                                     $TERN_BIN_DIR (default $CARGO_TARGET_DIR/debug)
#                                     and the example configs
#   scripts/containers.sh image       stage + podman build -t $TERN_IMAGE (tern:local)
#   scripts/containers.sh prepare     all of the above, in order
#
# podman runs as root here with runc and cgroupfs (no systemd in the machine),
# so every podman / podman-compose command needs
#   export CONTAINERS_CONF=$TERN_CONTAINERS_DIR/containers.conf
# which `conf` writes (TERN_CONTAINERS_DIR defaults to ~/.cache/tern-containers).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

TERN_CONTAINERS_DIR="${TERN_CONTAINERS_DIR:-$HOME/.cache/tern-containers}"
TERN_IMAGE="${TERN_IMAGE:-localhost/tern:local}"
BASE_IMAGE="debian:bookworm-slim"
export CONTAINERS_CONF="$TERN_CONTAINERS_DIR/containers.conf"

log() { echo "containers: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

cmd_install() {
  local need=()
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v podman-compose >/dev/null 2>&1 || need+=(podman-compose)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
  command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
  command -v slirp4netns >/dev/null 2>&1 || need+=(slirp4netns)
  [ -x /usr/lib/podman/netavark ] || command -v netavark >/dev/null 2>&1 || need+=(netavark)
  # netavark sets up container networks and published ports with iptables
  command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
  [ -x /usr/lib/podman/aardvark-dns ] || command -v aardvark-dns >/dev/null 2>&1 || need+=(aardvark-dns)
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# The hard limit `ulimit -H$1` of this shell, at most $2: a container may
# not get more than podman itself has.
hard_limit() {
  local v
  v="$(ulimit -H"$1")"
  if [ "$v" = unlimited ] || [ "$v" -gt "$2" ]; then v="$2"; fi
  echo "$v"
}

cmd_conf() {
  mkdir -p "$TERN_CONTAINERS_DIR"
  local tmp="$CONTAINERS_CONF.tmp.$$"
  local nofile nproc
  nofile="$(hard_limit n 65536)"
  # setrlimit(RLIMIT_NPROC) above pid_max fails in runc here
  nproc="$(hard_limit u "$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)")"
  # runc and cgroupfs: the machine has no systemd to manage cgroups. Explicit
  # ulimits within this machine's hard limits: podman's defaults ask for more
  # open files than a container here may have ("error setting rlimit type 7").
  cat >"$tmp" <<CONF
# Written by scripts/containers.sh conf; used with CONTAINERS_CONF=<this file>.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
CONF
  mv "$tmp" "$CONTAINERS_CONF"
}

cmd_base_image() {
  if podman image exists "$BASE_IMAGE"; then
    return 0
  fi
  local mirror="${TERN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  local root="$TERN_CONTAINERS_DIR/rootfs.$$"
  log "making $BASE_IMAGE with debootstrap --variant=minbase bookworm ($mirror)"
  rm -rf "$root"
  # minbase holds libc6, libgcc-s1 and libstdc++6 (apt needs them), which is
  # all tern's binaries link dynamically; ca-certificates for TLS to a master
  # or an OTLP collector with a public certificate.
  # The same debootstrap `install` looked for (root's PATH may lack /usr/sbin).
  local debootstrap
  debootstrap="$(command -v debootstrap || echo /usr/sbin/debootstrap)"
  if ! "$debootstrap" --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" \
    >"$TERN_CONTAINERS_DIR/debootstrap.log" 2>&1; then
    tail -30 "$TERN_CONTAINERS_DIR/debootstrap.log" >&2
    rm -rf "$root"
    return 1
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

# stage DIR: the build context of the `prebuilt` target (see docker/Dockerfile).
cmd_stage() {
  local ctx="$1"
  local bin_dir="${TERN_BIN_DIR:-$CARGO_TARGET_DIR/debug}"
  local b
  rm -rf "$ctx"
  mkdir -p "$ctx/bin" "$ctx/docker"
  for b in tern-master tern-slave; do
    [ -x "$bin_dir/$b" ] || { log "$bin_dir/$b not found: build it first (cargo build --bins)"; return 1; }
    cp "$bin_dir/$b" "$ctx/bin/$b"
  done
  cp docker/master.toml docker/slave.toml docker/Dockerfile "$ctx/docker/"
}

cmd_image() {
  local ctx="$TERN_CONTAINERS_DIR/context"
  cmd_stage "$ctx"
  local old new
  old="$(podman image inspect --format '{{.Id}}' "$TERN_IMAGE" 2>/dev/null || true)"
  log "building $TERN_IMAGE from $ctx"
  podman build -q --pull=never --target prebuilt -t "$TERN_IMAGE" \
    -f "$ctx/docker/Dockerfile" "$ctx" >/dev/null
  new="$(podman image inspect --format '{{.Id}}' "$TERN_IMAGE")"
  # The previous build of this tag (other binaries), unless a container uses it.
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  conf) cmd_conf ;;
  base-image) cmd_conf; cmd_base_image ;;
  stage) cmd_stage "${2:?usage: containers.sh stage DIR}" ;;
  image) cmd_conf; cmd_image ;;
  prepare) cmd_install; cmd_conf; cmd_base_image; cmd_image ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
