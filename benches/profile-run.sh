#!/usr/bin/env bash
# benches/cluster-run.sh with a CPU profile of the three servers: `perf record -e cpu-clock -g`
# (software clock: this VM kind has no hardware counters) for 5 s in the middle of a 10 s run.
# Prints the run's figures; the profile is OUT.data (read it with `perf report -i OUT.data`).
#
#   SIZE=1024 bash benches/profile-run.sh target/release/busbar batched 4096 /tmp/kib
#   perf report -i /tmp/kib.data --no-children --sort sym | head -40
set -euo pipefail
bin=$(realpath "${1:?usage: profile-run.sh BUSBAR_BINARY API IN_FLIGHT OUT}")
api=${2:?api}
inflight=${3:?in-flight}
out=${4:?output prefix}
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
load=$(cd "$(dirname "$0")/.." && pwd)/target/release/busbar-load
[ -x "$load" ] || { echo "build busbar-load first: cargo build --release -p busbar-benches --bin busbar-load" >&2; exit 1; }
data=$(mktemp -d)
peers="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$data"' EXIT
for i in 1 2 3; do
  "$bin" server --id "$i" --listen "127.0.0.1:1710$i" --data-dir "$data/n$i" --peers "$peers" >"$data/n$i.log" 2>&1 &
  pids+=($!)
done
sleep 4
"$load" --system busbar --brokers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 \
  --pids "$(IFS=,; echo "${pids[*]}")" --duration 10 --warmup 1 --mode throughput --api "$api" \
  --record-size "${SIZE:-100}" --partitions "${PARTITIONS:-8}" --producers 2 --consumers 1 \
  --in-flight "$inflight" ${EXTRA:-} >"$out.load" 2>&1 &
loadgen=$!
sleep 4
perf record -e cpu-clock -F 499 -g -p "$(IFS=,; echo "${pids[*]}")" -o "$out.data" -- sleep 5 >/dev/null 2>&1
wait "$loadgen"
grep -E "^acked|server cpu" "$out.load"
