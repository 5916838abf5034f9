#!/usr/bin/env bash
# A RATE-limited soak (as benches/soak.sh) with node 2 under heaptrack, killed with SIGKILL at KILLAT
# seconds so heaptrack's "leaked" is what was live then. Two runs (an early and a late KILLAT) and
#   heaptrack_print -f LATE/heap.zst -d EARLY/heap.zst --flamegraph-cost-type leaked -F stacks
# give what was allocated between the two points and is still live (docs/benchmarks.md, "Memory
# over a long run"). heaptrack sees glibc's malloc only: use a build without jemalloc as BIN.
#   BIN=/path/to/glibc-busbar BUSBAR_STORE_CACHE_MIB=1 RATE=80000 KILLAT=400 bash benches/heap-diff.sh 410
# Results in /tmp/heaprun (move it aside between runs).
set -u
bin=${BIN:-/work/main/target/release/busbar}
secs=${1:-300}
rate=${RATE:-60000}
d=/tmp/heaprun; rm -rf $d; mkdir -p $d
peers="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
pids=()
for i in 1 2 3; do
  pre=""; [ $i = 2 ] && pre="heaptrack -o $d/heap"
  $pre "$bin" server --id "$i" --listen "127.0.0.1:1710$i" --data-dir "$d/n$i" --peers "$peers" >"$d/n$i.log" 2>&1 &
  pids+=($!)
done
sleep 5
realpids=$(for i in 1 2 3; do pgrep -f "^$bin server --id $i "; done | paste -sd,)
echo "pids $realpids"
/work/main/target/release/busbar-load --system busbar --brokers 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103 \
  --pids "$realpids" --duration "$secs" --warmup 1 --api batched --mode rate --rate $rate \
  --record-size 100 --partitions 8 --producers 2 --consumers 1 --in-flight 4096 >"$d/load.out" 2>&1 &
lp=$!
start=$(date +%s)
while kill -0 "$lp" 2>/dev/null; do
  line="t=$(( $(date +%s) - start ))s"
  for p in ${realpids//,/ }; do line="$line rss=$(( $(awk '/VmRSS/{print $2}' "/proc/$p/status") / 1024 ))MiB"; done
  for i in 1 2 3; do line="$line n$i=$(du -sm "$d/n$i" 2>/dev/null | cut -f1)MiB"; done
  echo "$line"
  sleep 30
  if [ $(( $(date +%s) - start )) -ge ${KILLAT:-100000} ]; then kill -9 $(pgrep -f "^$bin server --id 2 "); KILLAT=100000; fi
done
grep -v '^{' "$d/load.out" | tail -5

sleep 10
kill "${pids[@]}" 2>/dev/null; wait
ls -la $d
