#!/usr/bin/env bash
# Builds tern and runs a master (gRPC 127.0.0.1:7400, Redis protocol
# 127.0.0.1:6380) and a slave (gRPC 127.0.0.1:7401, Redis protocol
# 127.0.0.1:6381) replicating on localhost, with data under ./data/.
# Ctrl-C stops both cleanly. RESP_MASTER / RESP_SLAVE change the RESP ports.
set -euo pipefail
# Job control: the nodes get process groups of their own, so a Ctrl-C reaches
# only this script, whose trap stops each node once (a second signal makes a
# node exit at once, without a clean shutdown).
set -m
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --bins
bin="$CARGO_TARGET_DIR/debug"
resp_master=127.0.0.1:${RESP_MASTER:-6380}
resp_slave=127.0.0.1:${RESP_SLAVE:-6381}
mkdir -p data
TERN__SERVER__RESP_LISTEN=$resp_master "$bin/tern-master" --listen 127.0.0.1:7400 --data-dir data/master &
master=$!
TERN__SERVER__RESP_LISTEN=$resp_slave "$bin/tern-slave" --listen 127.0.0.1:7401 --data-dir data/slave --master http://127.0.0.1:7400 &
slave=$!
trap 'kill -TERM $slave $master 2>/dev/null; wait' INT TERM
echo "tern: master on 127.0.0.1:7400 (pid $master, RESP $resp_master), slave on 127.0.0.1:7401 (pid $slave, RESP $resp_slave); Ctrl-C to stop" >&2
echo "tern: try  redis-cli -p ${resp_master##*:} set hello world  and  redis-cli -p ${resp_slave##*:} get hello" >&2
wait
