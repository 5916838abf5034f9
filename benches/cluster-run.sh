#!/usr/bin/env bash
# One busbar-load run against a fresh 3-node cluster on loopback, printing acknowledged records/s and
# the servers' CPU seconds per million acknowledged records. For A/B comparisons of two builds of the
# binary (copy each build aside, then alternate them); benches/compare.py is the full comparison.
#
#   bash benches/cluster-run.sh BUSBAR_BINARY [per-request|batched] [IN_FLIGHT]
#   DATA=/dev/shm/bb bash benches/cluster-run.sh target/release/busbar per-request 256   # on tmpfs
#   SIZE=1024 PARTITIONS=32 bash benches/cluster-run.sh target/release/busbar batched 4096
#   EXTRA="--linger-ms 0" adds busbar-load flags; DURATION (default 8) sets the measured seconds.
#   RATE=500 offers a fixed rate (records/s, mode rate) instead of as fast as possible, and prints
#   the produce-to-ack latencies too; SERVER_ARGS="--worker-threads 1" adds flags to the servers:
#   RATE=500 SERVER_ARGS="--worker-threads 1" bash benches/cluster-run.sh target/release/busbar
#   CONSUME=1000000 bash benches/cluster-run.sh target/release/busbar
#     writes that many records into one partition, then reads them back from offset 0 (the shape
#     of compare.py's consume-100) and prints the read rate.
#   CTX=1 RATE=500 bash benches/cluster-run.sh target/release/busbar per-request
#     also counts the servers' context switches over 5 s from 4 s in, per node and thread name
#     (voluntary + involuntary, from /proc/PID/task/*/status); the run lasts 10 s unless DURATION says.
#   PROFILE=/tmp/kib SIZE=1024 bash benches/cluster-run.sh target/release/busbar batched 4096
#     also records a CPU profile of the three servers, `perf record -e cpu-clock -g` (software clock:
#     this VM kind has no hardware counters) for 5 s from 4 s in, into /tmp/kib.data (read it with
#     `perf report -i /tmp/kib.data --no-children --sort sym`); the run lasts 10 s unless DURATION says.
#
# Used for the proposer, entry-cache and allocator experiments in docs/benchmarks.md.
set -euo pipefail
bin=$(realpath "${1:?usage: cluster-run.sh BUSBAR_BINARY [api] [in-flight]}")
api=${2:-per-request}
inflight=${3:-256}
load=$(cd "$(dirname "$0")/.." && pwd)/target/release/busbar-load
[ -x "$load" ] || { echo "build busbar-load first: cargo build --release -p busbar-benches --bin busbar-load" >&2; exit 1; }
data=${DATA:-$(mktemp -d)}
rm -rf "$data" && mkdir -p "$data"
peers="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$data"' EXIT
for i in 1 2 3; do
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of flags
  "$bin" server --id "$i" --listen "127.0.0.1:1710$i" --data-dir "$data/n$i" --peers "$peers" ${SERVER_ARGS:-} >"$data/n$i.log" 2>&1 &
  pids+=($!)
done
# Until there is a leader and every node applies at the newest version its build knows (a fresh
# cluster raises it a few seconds after its election; the record encoding changes with it).
brokers=127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103
ready=0
for _ in $(seq 60); do
  if "$bin" --brokers "$brokers" --output json cluster status 2>/dev/null | python3 -c '
import json, sys
nodes = [json.loads(l) for l in sys.stdin if l.strip()]
ok = len(nodes) == 3 and any(n["role"] == "leader" for n in nodes) and all(
    n["reachable"] and n["apply_version"] == n["max_apply_version"] for n in nodes)
sys.exit(0 if ok else 1)'; then
    ready=1
    break
  fi
  sleep 0.5
done
[ "$ready" = 1 ] || { echo "no leader, or the apply version not raised, after 30 s" >&2; exit 1; }
profile=${PROFILE:-}
duration=${DURATION:-8}
mode=(--mode throughput)
grep_default="^acked|server cpu"
if [ -n "${RATE:-}" ]; then
  mode=(--mode rate --rate "$RATE")
  grep_default="^acked|produce->ack|server cpu"
fi
if [ -n "$profile" ]; then
  command -v perf >/dev/null || { echo "PROFILE needs perf (Debian: linux-perf)" >&2; exit 1; }
  duration=${DURATION:-10}
fi
[ -n "${CTX:-}" ] && duration=${DURATION:-10}
shape=(--api "$api" --record-size "${SIZE:-100}" --partitions "${PARTITIONS:-8}" --producers 2 --consumers 1
  --in-flight "$inflight")
if [ -n "${CONSUME:-}" ]; then
  mode=(--mode consume --consume-records "$CONSUME" --drain-timeout 120)
  shape=(--api batched --record-size "${SIZE:-100}" --partitions 1 --producers 1 --consumers 1 --in-flight 8192)
  grep_default="^consumed|server cpu"
fi
"$load" --system busbar --brokers "$brokers" \
  --pids "$(IFS=,; echo "${pids[*]}")" --duration "$duration" --warmup 1 "${mode[@]}" "${shape[@]}" \
  ${EXTRA:-} >"$data/load.out" 2>&1 &
loadgen=$!
# Every thread's voluntary + involuntary context switches, as "node thread-name count" lines.
switches() {
  for i in 1 2 3; do
    for t in /proc/"${pids[$((i - 1))]}"/task/*; do
      awk -v node="$i" -v name="$(cat "$t/comm" 2>/dev/null)" \
        '/^(non)?voluntary_ctxt_switches/ { n += $2 } END { print node, name, n + 0 }' "$t/status" 2>/dev/null
    done
  done | awk '{ k = $1 " " $2; s[k] += $3 } END { for (k in s) print k, s[k] }' | sort
}
if [ -n "$profile" ]; then
  sleep 4
  perf record -e cpu-clock -F 499 -g -p "$(IFS=,; echo "${pids[*]}")" -o "$profile.data" -- sleep 5 >/dev/null 2>&1
elif [ -n "${CTX:-}" ]; then
  sleep 4
  switches >"$data/ctx.before"
  sleep 5
  switches >"$data/ctx.after"
  echo "context switches in 5 s (node, thread, count; threads with more than 100):"
  join <(awk '{ print $1 "/" $2, $3 }' "$data/ctx.before") <(awk '{ print $1 "/" $2, $3 }' "$data/ctx.after") |
    awk '{ d = $3 - $2; t += d; if (d > 100) print "  " $1, d } END { print "  total", t }'
fi
wait "$loadgen" || { cat "$data/load.out" >&2; exit 1; }
grep -E "${GREP:-$grep_default}" "$data/load.out"
