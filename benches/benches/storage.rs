//! Storage benchmark: the Raft WAL's append and the sled state machine's apply, each set against what the
//! disk underneath can do, in one run. See docs/benchmarks.md for what each row means.
//!
//! `cargo bench -p busbar-benches --bench storage`
//!
//! Environment:
//! - `BENCH_SCALE` (default 1): multiplies every phase's duration and the raw-disk sizes; 0.1 is a smoke
//!   run of a few seconds.
//! - `BENCH_DIR`: where to put the files (default: the cargo target directory, on the repository's disk).
//! - `BENCH_THREADS` (default 4): appenders in the group-commit phase.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use busbar_benches::{
    bench_root, bench_scale, filesystem_of, fmt_num, is_memory_fs, percentile, random_bytes, utc_now, CpuSample, Table,
};
use busbar_storage::wal::{Wal, WalOptions};
use busbar_storage::{TopicStore, TopicStoreOptions};
use busbar_types::{Command, CommandResponse, Record, TopicName};
use bytes::Bytes;

const MIB: usize = 1 << 20;
const MB: f64 = 1e6;

/// Sizes of one run, all derived from `BENCH_SCALE`.
struct Config {
    scale: f64,
    /// Bytes of the raw sequential write (1 MiB writes, one fdatasync at the end).
    disk_bytes: usize,
    /// Samples of 4 KiB write + fdatasync.
    sync_samples: usize,
    /// How long each WAL and apply phase keeps submitting work.
    phase: Duration,
    threads: usize,
}

impl Config {
    fn from_env() -> Result<Config> {
        let scale = bench_scale()?;
        let threads = match std::env::var("BENCH_THREADS") {
            Ok(s) => s.trim().parse::<usize>().with_context(|| format!("BENCH_THREADS={s:?}"))?,
            Err(_) => 4,
        };
        if !(1..=64).contains(&threads) {
            bail!("BENCH_THREADS must be 1..=64, got {threads}");
        }
        Ok(Config {
            scale,
            disk_bytes: ((256.0 * scale).round() as usize).max(64) * MIB,
            sync_samples: ((1000.0 * scale).round() as usize).max(100),
            phase: Duration::from_secs_f64(8.0 * scale),
            threads,
        })
    }
}

/// What one phase did, as counted by the phase itself.
#[derive(Default)]
struct Outcome {
    elapsed: Duration,
    /// Payload bytes (WAL entry payloads, record values); framing and sled's own overhead not included.
    bytes: u64,
    /// Appends, apply calls, or write+fsync pairs.
    ops: u64,
    /// WAL entries or records.
    items: u64,
    /// fdatasyncs issued (WAL: syncer rounds).
    syncs: u64,
    /// Per-op latency: append to its callback, or one write + fdatasync.
    latencies: Vec<Duration>,
    /// Raw sequential write only: how much of `elapsed` the final fdatasync took.
    final_sync: Option<Duration>,
}

/// One line of the table.
struct Row {
    name: String,
    out: Outcome,
    cpu_secs: Option<f64>,
    wall: Duration,
    steal_pct: Option<f64>,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The raw sequential write: the yardstick, re-measured between phases.
    DiskSeq,
    DiskSync,
    Wal,
    Apply,
    /// flush_durable after an apply phase; not a phase of its own.
    Flush,
}

impl Kind {
    /// Whether each op is acknowledged only after an fdatasync, so `ops/s ÷ raw fsync rate` means something.
    fn synced_ops(self) -> bool {
        matches!(self, Kind::DiskSync | Kind::Wal)
    }
}

fn run_phase(name: &str, kind: Kind, f: impl FnOnce() -> Result<Outcome>) -> Result<Row> {
    eprintln!("  running: {name}");
    let before = CpuSample::now().ok();
    let start = Instant::now();
    let out = f().with_context(|| format!("phase {name:?}"))?;
    let wall = start.elapsed();
    let after = CpuSample::now().ok();
    let (cpu_secs, steal_pct) = match (before, after) {
        (Some(b), Some(a)) => (Some(b.process_secs(&a)), Some(b.steal_pct(&a))),
        _ => (None, None),
    };
    Ok(Row { name: name.to_string(), out, cpu_secs, wall, steal_pct, kind })
}

/// 1 MiB writes into a new file, then one fdatasync; the time includes the fdatasync, so this is the
/// disk's sustained sequential write speed, not the page cache's.
fn disk_sequential(dir: &Path, total: usize, seed: u64) -> Result<Outcome> {
    let path = dir.join(format!("disk-seq-{seed}"));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&path)?;
    let chunk = random_bytes(MIB, seed);
    let n = total / MIB;
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&chunk)?;
    }
    let sync_start = Instant::now();
    f.sync_data()?;
    let elapsed = start.elapsed();
    let final_sync = Some(sync_start.elapsed());
    drop(f);
    std::fs::remove_file(&path)?;
    // ops/items/syncs stay 0: rates of one fdatasync and of page-cache writes would only mislead.
    Ok(Outcome { elapsed, bytes: (n * MIB) as u64, latencies: vec![elapsed], final_sync, ..Outcome::default() })
}

/// 4 KiB appended to a file, then fdatasync, `samples` times: the floor under any acknowledged write.
/// Appending (not overwriting) makes each fdatasync also persist the new file size, as a WAL append does.
fn disk_sync_latency(dir: &Path, samples: usize) -> Result<Outcome> {
    let path = dir.join("disk-sync");
    let mut f: File = OpenOptions::new().write(true).create_new(true).open(&path)?;
    let block = random_bytes(4096, 42);
    let mut latencies = Vec::with_capacity(samples);
    let start = Instant::now();
    for _ in 0..samples {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    let n = samples as u64;
    Ok(Outcome { elapsed, bytes: n * 4096, ops: n, items: n, syncs: n, latencies, final_sync: None })
}

/// How the WAL is driven in one phase.
struct WalLoad {
    appenders: usize,
    entries_per_append: usize,
    entry_bytes: usize,
    /// Appends each appender may have submitted but not yet seen acknowledged; 1 = wait for each.
    in_flight: usize,
}

/// Appenders share one log; each takes the index lock, allocates the next contiguous range and appends
/// while holding it (the log requires contiguous indexes in submission order). The clock stops when the
/// last callback has fired, i.e. when everything submitted is durable.
fn wal_phase(dir: &Path, load: &WalLoad, run_for: Duration) -> Result<Outcome> {
    let wal = Wal::open(&dir.join("wal"), WalOptions::default())?;
    let next_index = Mutex::new(1u64);
    let syncs_before = wal.sync_count();
    let start = Instant::now();
    let deadline = start + run_for;
    let per_thread: Vec<Result<(u64, Vec<Duration>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.appenders)
            .map(|t| {
                let (wal, next_index) = (&wal, &next_index);
                s.spawn(move || appender(wal, next_index, load, deadline, t as u64))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("appender thread panicked")))).collect()
    });
    let elapsed = start.elapsed();
    let syncs = wal.sync_count() - syncs_before;
    wal.close()?;

    let mut out = Outcome { elapsed, syncs, ..Outcome::default() };
    for r in per_thread {
        let (appends, mut lat) = r?;
        out.ops += appends;
        out.latencies.append(&mut lat);
    }
    out.items = out.ops * load.entries_per_append as u64;
    out.bytes = out.items * load.entry_bytes as u64;
    Ok(out)
}

fn appender(
    wal: &Wal,
    next_index: &Mutex<u64>,
    load: &WalLoad,
    deadline: Instant,
    seed: u64,
) -> Result<(u64, Vec<Duration>)> {
    // One random payload per entry slot, shared by every append (Bytes clones are cheap); the log still
    // copies and checksums each one, which is the work we want to count.
    let payloads: Vec<Bytes> = (0..load.entries_per_append)
        .map(|i| Bytes::from(random_bytes(load.entry_bytes, seed * 1_000_003 + i as u64)))
        .collect();
    let (tx, rx) = mpsc::channel::<std::io::Result<Duration>>();
    let mut outstanding = 0usize;
    let mut appends = 0u64;
    let mut latencies = Vec::new();
    let settle = |outstanding: &mut usize, latencies: &mut Vec<Duration>| -> Result<()> {
        let r = rx.recv().map_err(|_| anyhow!("wal dropped a flush callback"))?;
        *outstanding -= 1;
        latencies.push(r.context("wal fdatasync failed")?);
        Ok(())
    };
    while Instant::now() < deadline {
        while outstanding >= load.in_flight {
            settle(&mut outstanding, &mut latencies)?;
        }
        let tx = tx.clone();
        let submitted = Instant::now();
        let done = Box::new(move |r: std::io::Result<()>| {
            // The appender may have bailed out; then nobody is waiting and the result is moot.
            let _ = tx.send(r.map(|()| submitted.elapsed()));
        });
        {
            let mut next = next_index.lock().unwrap_or_else(PoisonError::into_inner);
            let first = *next;
            let entries: Vec<(u64, Bytes)> =
                payloads.iter().enumerate().map(|(i, p)| (first + i as u64, p.clone())).collect();
            wal.append(entries, done)?;
            *next = first + payloads.len() as u64;
        }
        outstanding += 1;
        appends += 1;
    }
    while outstanding > 0 {
        settle(&mut outstanding, &mut latencies)?;
    }
    Ok((appends, latencies))
}

const RECORDS_PER_BATCH: usize = 100;
const RECORD_BYTES: usize = 100;
const PARTITIONS: u32 = 4;

/// Produce commands of 100 records × 100 B, `batches_per_call` of them per `apply`, round-robin over
/// 4 partitions. `apply` writes into sled without an fsync (durability comes from the WAL); the durable
/// cost is measured separately by `flush_durable` afterwards, returned as the second value.
fn apply_phase(dir: &Path, batches_per_call: usize, run_for: Duration) -> Result<(Outcome, Duration)> {
    let store = TopicStore::open(&dir.join("sled"), &TopicStoreOptions::default())?;
    let topic = TopicName::new("bench")?;
    let create = Command::CreateTopic { name: topic.clone(), partitions: PARTITIONS, config: Default::default() };
    let mut applied = 1u64;
    expect_ok(&store.apply(&[Some(&create)], Bytes::copy_from_slice(&applied.to_be_bytes()))?)?;

    let mut produce: Vec<Command> = Vec::new();
    for p in 0..PARTITIONS {
        let records: Vec<Record> = (0..RECORDS_PER_BATCH)
            .map(|i| Record {
                key: None,
                value: Bytes::from(random_bytes(RECORD_BYTES, u64::from(p) * 1_000 + i as u64)),
                headers: vec![],
                timestamp_ms: 1_700_000_000_000 + i as i64,
            })
            .collect();
        produce.push(Command::Produce {
            topic: topic.clone(),
            partition: p,
            // The store stays at apply version 1, where leaders propose bincode.
            records: busbar_types::RecordBatch::encode(&records, busbar_types::RecordEncoding::Bincode)?,
            // Not idempotent: the same four commands are applied again and again, and with a producer
            // sequence every repeat would be answered as a duplicate without writing anything.
            producer: None,
        });
    }

    let mut calls = 0u64;
    let mut latencies = Vec::new();
    let start = Instant::now();
    let deadline = start + run_for;
    while Instant::now() < deadline {
        let cmds: Vec<Option<&Command>> = (0..batches_per_call)
            .map(|j| Some(&produce[(calls as usize * batches_per_call + j) % produce.len()]))
            .collect();
        applied += 1;
        let t = Instant::now();
        let responses = store.apply(&cmds, Bytes::copy_from_slice(&applied.to_be_bytes()))?;
        latencies.push(t.elapsed());
        expect_ok(&responses)?;
        calls += 1;
    }
    let elapsed = start.elapsed();
    let flush_start = Instant::now();
    store.flush_durable()?;
    let flush = flush_start.elapsed();
    drop(store);

    let batches = calls * batches_per_call as u64;
    let items = batches * RECORDS_PER_BATCH as u64;
    let out = Outcome {
        elapsed,
        bytes: items * RECORD_BYTES as u64,
        ops: calls,
        items,
        syncs: 0,
        latencies,
        final_sync: None,
    };
    Ok((out, flush))
}

fn expect_ok(responses: &[CommandResponse]) -> Result<()> {
    let wrote_nothing = |r: &&CommandResponse| {
        matches!(r, CommandResponse::Rejected { .. } | CommandResponse::Produced { duplicate: true, .. })
    };
    match responses.iter().find(wrote_nothing) {
        Some(r) => bail!("the state machine did not write a bench command: {r:?}"),
        None => Ok(()),
    }
}

/// A scratch directory for one phase, removed afterwards so the disk does not fill up over the run.
fn in_subdir<T>(root: &Path, name: &str, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let dir = root.join(name);
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let r = f(&dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    r
}

fn main() -> Result<()> {
    let cfg = Config::from_env()?;
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new().prefix("busbar-bench-storage-").tempdir_in(&root)?;
    let dir = tmp.path();
    let fs = filesystem_of(dir);
    if let Some((fstype, _, _)) = &fs {
        if is_memory_fs(fstype) {
            bail!(
                "{} is on {fstype}: fdatasync would cost nothing; set BENCH_DIR to a directory on disk",
                dir.display()
            );
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "busbar storage bench: scale {}, {:.1} s per phase, in {}",
        cfg.scale,
        cfg.phase.as_secs_f64(),
        dir.display()
    );

    let load_before = loadavg();
    let run_start = CpuSample::now().ok();
    let run_clock = Instant::now();
    let mut rows = Vec::new();
    // The disk's speed on this shared host moves by up to 5x between consecutive runs, so it is re-measured
    // between phases (A B A B ...) and every phase is compared with the median of all those runs.
    let mut disk_run = 0u64;
    let mut measure_disk = |rows: &mut Vec<Row>| -> Result<()> {
        disk_run += 1;
        let name = format!("disk #{disk_run}: 1 MiB writes, 1 fdatasync");
        rows.push(run_phase(&name, Kind::DiskSeq, || disk_sequential(dir, cfg.disk_bytes, disk_run))?);
        Ok(())
    };

    measure_disk(&mut rows)?;
    rows.push(run_phase("disk: 4 KiB write + fdatasync", Kind::DiskSync, || disk_sync_latency(dir, cfg.sync_samples))?);

    let wal = |appenders, entries_per_append, in_flight| WalLoad {
        appenders,
        entries_per_append,
        entry_bytes: 1024,
        in_flight,
    };
    let loads = [
        ("wal a: 1x1KiB/append, wait each".to_string(), wal(1, 1, 1)),
        ("wal b: 64x1KiB/append, wait each".to_string(), wal(1, 64, 1)),
        ("wal b': 64x1KiB/append, 8 in flight".to_string(), wal(1, 64, 8)),
        (format!("wal c: {} threads x 1x1KiB, wait each", cfg.threads), wal(cfg.threads, 1, 1)),
    ];
    for (name, load) in &loads {
        rows.push(run_phase(name, Kind::Wal, || in_subdir(dir, "wal", |d| wal_phase(d, load, cfg.phase)))?);
        measure_disk(&mut rows)?;
    }

    for k in [1usize, 16] {
        let mut flush = Duration::ZERO;
        let name = format!("apply: {k} x 100x100B batch/call");
        let row = run_phase(&name, Kind::Apply, || {
            in_subdir(dir, "apply", |d| {
                let (out, f) = apply_phase(d, k, cfg.phase)?;
                flush = f;
                Ok(out)
            })
        })?;
        let (bytes, apply_secs) = (row.out.bytes, row.out.elapsed);
        rows.push(row);
        rows.push(Row {
            name: "  then flush_durable (MB/s incl. it)".to_string(),
            out: Outcome { elapsed: flush, bytes, latencies: vec![flush], ..Outcome::default() },
            cpu_secs: None,
            wall: apply_secs + flush,
            steal_pct: None,
            kind: Kind::Flush,
        });
        measure_disk(&mut rows)?;
    }
    let run_end = CpuSample::now().ok();
    let total = run_clock.elapsed();

    let steal = run_start.zip(run_end).map(|(b, a)| b.steal_pct(&a));
    print_report(&cfg, dir, fs, cores, &mut rows, steal, total);
    // Other processes on this machine compete for the same cores and disk; steal does not show them.
    println!("load average (1 min) at start {load_before}, at end {}", loadavg());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn mb_per_s(r: &Row) -> f64 {
    r.out.bytes as f64 / MB / r.out.elapsed.as_secs_f64()
}

fn print_report(
    cfg: &Config,
    dir: &Path,
    fs: Option<(String, String, String)>,
    cores: usize,
    rows: &mut [Row],
    steal: Option<f64>,
    total: Duration,
) {
    let mut disk: Vec<f64> = rows.iter().filter(|r| r.kind == Kind::DiskSeq).map(mb_per_s).collect();
    let disk_syncs: Vec<String> =
        rows.iter().filter_map(|r| r.out.final_sync).map(|d| format!("{:.2}", d.as_secs_f64())).collect();
    disk.sort_by(f64::total_cmp);
    let disk_median = disk.get(disk.len() / 2).copied();
    let raw_sync_per_s = rows
        .iter_mut()
        .find(|r| r.kind == Kind::DiskSync)
        .and_then(|r| percentile(&mut r.out.latencies, 0.5))
        .map(|d| 1.0 / d.as_secs_f64());

    let mut t = Table::new(&[
        "phase", "secs", "MB/s", "ops/s", "items/s", "fsync/s", "xdisk", "xsync", "p50 ms", "p99 ms", "max ms", "cpu%",
        "steal%",
    ]);
    for r in rows.iter_mut() {
        let secs = r.out.elapsed.as_secs_f64();
        // For the flush row, MB/s is the apply's payload over apply + flush time: what the state machine
        // sustains if it is made durable at the end.
        let mbps = if r.kind == Kind::Flush { r.out.bytes as f64 / MB / r.wall.as_secs_f64() } else { mb_per_s(r) };
        let per_s = |n: u64| (n > 0).then(|| n as f64 / secs);
        let ops_s = per_s(r.out.ops);
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let many = r.out.latencies.len() > 1;
        let p50 = if many { ms(percentile(&mut r.out.latencies, 0.5)) } else { None };
        let p99 = if many { ms(percentile(&mut r.out.latencies, 0.99)) } else { None };
        let max = if many { ms(r.out.latencies.iter().max().copied()) } else { None };
        t.row(vec![
            r.name.clone(),
            fmt_num(Some(secs)),
            fmt_num(Some(mbps)),
            fmt_num(ops_s),
            fmt_num(per_s(r.out.items)),
            fmt_num(per_s(r.out.syncs)),
            fmt_num(if r.kind == Kind::DiskSeq { None } else { disk_median.map(|d| mbps / d) }),
            fmt_num(if r.kind.synced_ops() { ops_s.zip(raw_sync_per_s).map(|(o, s)| o / s) } else { None }),
            fmt_num(p50),
            fmt_num(p99),
            fmt_num(max),
            fmt_num(r.cpu_secs.map(|c| 100.0 * c / r.wall.as_secs_f64())),
            fmt_num(r.steal_pct),
        ]);
    }

    let (fstype, dev) = fs.map_or(("?".to_string(), "?".to_string()), |(t, d, _)| (t, d));
    println!();
    println!("busbar storage bench, {}", utc_now());
    println!(
        "dir {} ({fstype} on {dev}), {cores} cores, BENCH_SCALE={} ({:.1} s per phase, {} MiB per disk run)",
        dir.display(),
        cfg.scale,
        cfg.phase.as_secs_f64(),
        cfg.disk_bytes / MIB
    );
    println!(
        "raw disk: median {} MB/s over {} runs (min {}, max {}); final fdatasync of each run (s): {}",
        fmt_num(disk_median),
        disk.len(),
        fmt_num(disk.first().copied()),
        fmt_num(disk.last().copied()),
        disk_syncs.join(" ")
    );
    println!("raw 4 KiB write + fdatasync rate (1 / median latency): {}/s", fmt_num(raw_sync_per_s));
    println!();
    print!("{}", t.render());
    println!();
    println!(
        "CPU steal over the whole run: {}% ({:.0} s); MB/s = payload only, 10^6 B/s",
        fmt_num(steal),
        total.as_secs_f64()
    );
    println!("xdisk = MB/s / median raw disk MB/s; xsync = ops/s / raw 4 KiB fsync rate (>1: fsyncs are shared)");
    println!("ops = appends | apply calls | write+fsync; items = entries | records; cpu% = of one core, all threads");
}
