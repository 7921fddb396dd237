#!/usr/bin/env bash
# A Flower deployment on one machine: one SuperLink and two SuperNodes as separate processes on
# 127.0.0.1 (insecure gRPC, loopback only), then `flwr run` of spafl's app against them.
# Deployment on real machines is the same with the SuperLink's address instead of 127.0.0.1
# (and TLS: drop --insecure, see Flower's docs). Needs `pip install -e ".[flower]"`.
#
#   bash scripts/flower_loopback.sh [OUT_DIR] [ROUNDS]
#
# Leaves OUT_DIR/history.csv (the run), OUT_DIR/logs/ (every process's log) and exits non-zero
# if the run did not finish. Ports: 9091 (SuperLink), 9094 and 9095 (the SuperNodes' runtime
# APIs), or SUPERLINK_PORT and SUPERNODE_PORTS="P0 P1" from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-runs/flower-loopback}")
rounds=${2:-3}
link_port=${SUPERLINK_PORT:-9091}
read -r -a node_ports <<<"${SUPERNODE_PORTS:-9094 9095}"
rm -rf "$out"
mkdir -p "$out/logs" "$out/flwr-home"
export FLWR_HOME="$out/flwr-home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$link_port"
insecure = true
TOML

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Flower 1.41 serves the SuperLink's Fleet, Control and Runtime APIs on one HTTP port.
flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$link_port" \
    >"$out/logs/superlink.log" 2>&1 &
pids+=($!)
for p in 0 1; do
    flower-supernode --insecure --superlink "127.0.0.1:$link_port" --host 127.0.0.1 --port "${node_ports[$p]}" \
        --node-config "partition-id=$p num-partitions=2" >"$out/logs/supernode-$p.log" 2>&1 &
    pids+=($!)
done
sleep 5

# Two clients (one per SuperNode), both trained every round, on the built-in digits data.
flwr run . loopback --stream \
    --run-config "num-clients=2 clients-per-round=2 rounds=$rounds state-dir='$out/state' out-dir='$out'" \
    2>&1 | tee "$out/logs/flwr-run.log"

test -f "$out/history.csv" || { echo "no history: the run failed (see $out/logs)" >&2; exit 1; }
rows=$(($(wc -l <"$out/history.csv") - 1))
[ "$rows" -eq "$rounds" ] || { echo "history has $rows rounds, expected $rounds (see $out/logs)" >&2; exit 1; }
echo "loopback deployment: $rounds rounds over 2 SuperNodes; history in $out/history.csv"
