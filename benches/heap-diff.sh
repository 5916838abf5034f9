#!/usr/bin/env bash
# A RATE-limited soak (as benches/soak.sh) with node 2 under heaptrack, killed with SIGKILL at KILLAT
# seconds so heaptrack's "leaked" is what was live then. Two runs (an early and a late KILLAT) and
#   heaptrack_print -f LATE/heap.zst -d EARLY/heap.zst --flamegraph-cost-type leaked -F stacks
# give what was allocated between the two points and is still live (docs/benchmarks.md, "Memory
# over a long run"). heaptrack sees glibc's malloc only, so BIN must be a build without jemalloc:
#   cargo build --release -p busbar --no-default-features --target-dir target/glibc
#   BIN=target/glibc/release/busbar BUSBAR_STORE_CACHE_MIB=1 RATE=80000 KILLAT=400 bash benches/heap-diff.sh 410
# LOAD is the load generator (default target/release/busbar-load). Results in /tmp/heaprun (move
# it aside between runs).
set -u
cd "$(dirname "$0")/.."
bin=$(realpath "${BIN:-target/release/busbar}")
load=${LOAD:-target/release/busbar-load}
secs=${1:-300}
rate=${RATE:-60000}
d=/tmp/heaprun; rm -rf $d; mkdir -p $d
peers="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
for i in 1 2 3; do
  pre=""; [ $i = 2 ] && pre="heaptrack -o $d/heap"
  $pre "$bin" server --id "$i" --listen "127.0.0.1:1710$i" --data-dir "$d/n$i" --peers "$peers" >"$d/n$i.log" 2>&1 &
done
sleep 5
realpids=$(for i in 1 2 3; do pgrep -f "^$bin server --id $i "; done | paste -sd,)
echo "pids $realpids"
"$load" --system busbar --brokers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 \
  --pids "$realpids" --duration "$secs" --warmup 1 --api batched --mode rate --rate "$rate" \
  --record-size 100 --partitions 8 --producers 2 --consumers 1 --in-flight 4096 >"$d/load.out" 2>&1 &
lp=$!
if [ -n "${KILLAT:-}" ]; then
  (sleep "$KILLAT"; kill -9 $(pgrep -f "^$bin server --id 2 ") 2>/dev/null) &
  killer=$!
fi
start=$(date +%s)
while kill -0 "$lp" 2>/dev/null; do
  line="t=$(($(date +%s) - start))s"
  for p in ${realpids//,/ }; do
    kb=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || true)
    line="$line rss=$((${kb:-0} / 1024))MiB"
  done
  for i in 1 2 3; do line="$line n$i=$(du -sm "$d/n$i" 2>/dev/null | cut -f1)MiB"; done
  echo "$line"
  sleep 30
done
grep -v '^{' "$d/load.out" | tail -5

sleep 10
# The servers themselves (node 2's parent is heaptrack, which exits when it does).
kill ${realpids//,/ } ${killer:-} 2>/dev/null
wait
ls -la $d
