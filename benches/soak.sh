#!/usr/bin/env bash
# A long batched run against a fresh 3-node loopback cluster, printing every 10 s each node's RSS and
# data directory size: what docs/benchmarks.md "Memory and disk over a long run" comes from.
#
#   bash benches/soak.sh target/release/busbar 420
#   BUSBAR_SNAPSHOT_EVERY=20000 bash benches/soak.sh target/release/busbar 420   # any server flag's
#                                                          # BUSBAR_* variable reaches the nodes
#   RATE=50000 bash benches/soak.sh target/release/busbar 1800   # a fixed offered load instead of
#                                                          # as fast as possible (longer runs fit the disk)
#
# Needs target/release/busbar-load (cargo build --release -p busbar-benches --bin busbar-load).
set -u
bin=$(realpath "${1:?usage: soak.sh BUSBAR_BINARY SECONDS}")
secs=${2:-420}
root=$(cd "$(dirname "$0")/.." && pwd)
d=$(mktemp -d)
peers="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
pids=()
for i in 1 2 3; do
  "$bin" server --id "$i" --listen "127.0.0.1:1710$i" --data-dir "$d/n$i" --peers "$peers" >"$d/n$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$d"' EXIT
sleep 4
"$root/target/release/busbar-load" --system busbar --brokers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 \
  --pids "$(IFS=,; echo "${pids[*]}")" --duration "$secs" --warmup 1 --api batched \
  $(if [ -n "${RATE:-}" ]; then echo "--mode rate --rate $RATE"; else echo "--mode throughput"; fi) \
  --record-size 100 --partitions 8 --producers 2 --consumers 1 --in-flight 4096 >"$d/load.out" 2>&1 &
lp=$!
start=$(date +%s)
while kill -0 "$lp" 2>/dev/null; do
  line="t=$(( $(date +%s) - start ))s"
  for p in "${pids[@]}"; do line="$line rss=$(( $(awk '/VmRSS/{print $2}' "/proc/$p/status") / 1024 ))MiB"; done
  for i in 1 2 3; do line="$line n$i=$(du -sm "$d/n$i" 2>/dev/null | cut -f1)MiB"; done
  echo "$line"
  sleep 10
done
grep -v '^{' "$d/load.out"
for i in 1 2 3; do du -sm "$d/n$i"/*; done
