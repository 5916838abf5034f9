//! Batch-file compaction: what deleting a topic whose batches share files with a retained topic's
//! gives back, before and after `TopicStore::compact`, and what compaction costs.
//!
//! ```text
//! cargo bench -p busbar-benches --bench compaction                   # 1 GiB written, about 30 s
//! BENCH_SCALE=0.1 cargo bench -p busbar-benches --bench compaction   # smoke run
//! BENCH_KEEP=5/8 cargo bench -p busbar-benches --bench compaction    # files 62% live
//! BENCH_SCALE=0.2 BENCH_BATCH=1x100 BENCH_KEEP=1/2 cargo bench -p busbar-benches --bench compaction
//!     # 1M references of one-record batches: rounds look at a bounded stretch each
//! BENCH_SCALE=0.05 BENCH_BATCH=1x100 BENCH_KEEP=1/2 BENCH_APPLY_VERSION=2 cargo bench -p busbar-benches --bench compaction
//!     # one-record batches as before apply version 3 (each its own stored batch), to set beside
//!     # the same without BENCH_APPLY_VERSION (merged into each partition's last batch)
//! ```
//!
//! Two topics of one partition take batches of 64 records of 1 KiB in turn: `bulk` nine of every
//! ten, `keep` the tenth (`BENCH_KEEP`, default `1/10`), so every 64 MiB batch file holds both (as in
//! a cluster where a busy, short-retained topic shares the node with a quiet, long-retained one).
//! A compaction round runs every 65,536 batches written, as a node's reclaimer would meanwhile.
//! Then `bulk` is deleted and reclaimed. Without compaction nothing is freed: each file still holds
//! `keep` batches. The bench then runs compaction rounds back to back (a node's reclaimer runs one
//! every 10 s, and the next at once while rounds move batches) until one finds nothing to do, and
//! reads `keep` back whole.
//!
//! `BENCH_DIR` chooses the directory, as for the storage bench (never a tmpfs: sync costs matter).
//! `BENCH_APPLY_VERSION` the rules the store applies by (default: the newest this build knows, as
//! a cluster of one build raises its log to).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use busbar_benches::{bench_root, bench_scale, fmt_num, random_bytes, utc_now, CpuSample, Table};
use busbar_storage::{TopicStore, TopicStoreOptions};
use busbar_types::{Command, CommandResponse, Record, RecordBatch, RecordEncoding, TopicName};
use bytes::Bytes;

const MIB: u64 = 1 << 20;
const MB: f64 = 1e6;
/// Live batch bytes per compaction round, as the node's reclaimer uses.
const ROUND_BYTES: u64 = 256 << 20;
/// A compaction round every this many batches written (about a node's every 10 s at 6,500
/// one-record batches a second).
const COMPACT_EVERY_BATCHES: u64 = 65_536;

/// `BENCH_BATCH=RxB`: batches of R records of B bytes (default 64x1024).
fn batch_shape() -> Result<(usize, usize)> {
    let Ok(v) = std::env::var("BENCH_BATCH") else { return Ok((64, 1024)) };
    let parsed =
        v.split_once('x').and_then(|(r, b)| Some((r.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)));
    match parsed {
        Some((r, b)) if (1..=100_000).contains(&r) && (1..=1 << 20).contains(&b) => Ok((r, b)),
        _ => bail!("BENCH_BATCH must be RxB: R records (1 to 100,000) of B bytes (1 to 1 MiB) per batch, not {v:?}"),
    }
}

fn batch(seed: u64, records: usize, record_bytes: usize, encoding: RecordEncoding) -> Result<RecordBatch> {
    let records: Vec<Record> = (0..records)
        .map(|i| Record {
            key: None,
            value: Bytes::from(random_bytes(record_bytes, (seed << 32) + i as u64)),
            headers: vec![],
            timestamp_ms: 1_700_000_000_000,
        })
        .collect();
    Ok(RecordBatch::encode(&records, encoding)?)
}

/// `BENCH_APPLY_VERSION`: 1 up to the newest this build knows.
fn apply_version() -> Result<u32> {
    let newest = busbar_storage::apply_version::APPLY_VERSION;
    let Ok(v) = std::env::var("BENCH_APPLY_VERSION") else { return Ok(newest) };
    match v.trim().parse::<u32>() {
        Ok(n) if (1..=newest).contains(&n) => Ok(n),
        _ => bail!("BENCH_APPLY_VERSION must be 1 to {newest}, not {v:?}"),
    }
}

fn apply(store: &TopicStore, cmd: &Command, pos: &mut u64) -> Result<()> {
    *pos += 1;
    let r = store.apply(&[Some(cmd)], Bytes::copy_from_slice(&pos.to_be_bytes()))?;
    if let Some(CommandResponse::Rejected { code, message }) = r.first() {
        bail!("the store rejected a bench command: {code:?} {message}");
    }
    Ok(())
}

/// `BENCH_KEEP=K/N`: `keep` takes K of every N batches.
fn keep_share() -> Result<(u64, u64)> {
    let Ok(v) = std::env::var("BENCH_KEEP") else { return Ok((1, 10)) };
    let parsed =
        v.split_once('/').and_then(|(k, n)| Some((k.trim().parse::<u64>().ok()?, n.trim().parse::<u64>().ok()?)));
    match parsed {
        Some((k, n)) if 0 < k && k < n => Ok((k, n)),
        _ => bail!("BENCH_KEEP must be K/N with 0 < K < N (K of every N batches kept), not {v:?}"),
    }
}

fn main() -> Result<()> {
    let scale = bench_scale()?;
    let (keep_k, keep_n) = keep_share()?;
    let (records_per_batch, record_bytes) = batch_shape()?;
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new().prefix("busbar-bench-compaction-").tempdir_in(&root)?;
    let store = TopicStore::open(&tmp.path().join("state"), &TopicStoreOptions::default())?;
    let (keep, bulk) = (TopicName::new("keep")?, TopicName::new("bulk")?);
    let mut pos = 0;
    let version = apply_version()?;
    apply(&store, &Command::SetApplyVersion { version }, &mut pos)?;
    for name in [&keep, &bulk] {
        let create = Command::CreateTopic { name: name.clone(), partitions: 1, config: Default::default() };
        apply(&store, &create, &mut pos)?;
    }
    let total = (1024.0 * scale * MIB as f64) as u64;
    let per_batch = (records_per_batch * record_bytes) as u64;
    let batches = (total / per_batch).max(keep_n);
    // In the encoding a leader proposes at this version.
    let encoding = busbar_storage::apply_version::record_encoding(version);
    let samples =
        [batch(1, records_per_batch, record_bytes, encoding)?, batch(2, records_per_batch, record_bytes, encoding)?];
    let mut kept_records = 0u64;
    let write_start = Instant::now();
    for i in 0..batches {
        let to_keep = i % keep_n >= keep_n - keep_k;
        let cmd = Command::Produce {
            topic: if to_keep { keep.clone() } else { bulk.clone() },
            partition: 0,
            records: samples[usize::from(to_keep)].clone(),
            producer: None,
        };
        apply(&store, &cmd, &mut pos)?;
        kept_records += if to_keep { records_per_batch as u64 } else { 0 };
        if (i + 1) % COMPACT_EVERY_BATCHES == 0 {
            // As a node's reclaimer does while the writes go on: only files already mostly dead
            // (replaced versions of merged tails) have anything to give back here.
            store.compact(ROUND_BYTES)?;
        }
    }
    store.flush_durable()?;
    let write_secs = write_start.elapsed().as_secs_f64();
    let live_payload = kept_records * record_bytes as u64;
    let written = store.size_on_disk()?;
    let (written_files, _) = store.batch_file_bytes()?;

    apply(&store, &Command::DeleteTopic { name: bulk.clone() }, &mut pos)?;
    while store.reclaim(10_000)? > 0 {}
    store.flush_durable()?;
    let reclaimed = store.size_on_disk()?;

    let cpu_before = CpuSample::now().ok();
    let start = Instant::now();
    let (mut rounds, mut files, mut moved, mut freed) = (0u32, 0usize, 0u64, 0u64);
    let mut round_secs = Vec::new();
    loop {
        let t = Instant::now();
        let s = store.compact(ROUND_BYTES)?;
        if s.batches == 0 && !s.more {
            break;
        }
        round_secs.push(t.elapsed());
        rounds += 1;
        files += s.files;
        moved += s.moved_bytes;
        freed += s.freed_bytes;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(CpuSample::now().ok()).map(|(b, a)| b.process_secs(&a));
    let compacted = store.size_on_disk()?;

    let read_start = Instant::now();
    let mut offset = 0u64;
    while offset < kept_records {
        let got = store.read("keep", 0, offset, 100_000, 16 << 20)?;
        offset += got.records.len() as u64;
        if got.records.is_empty() {
            bail!("keep stops at offset {offset} of {kept_records}");
        }
    }
    let read_secs = read_start.elapsed().as_secs_f64();

    let ratio = |bytes: u64| Some(bytes as f64 / live_payload as f64);
    let mut t = Table::new(&["state", "store MB", "x live payload"]);
    t.row(vec!["written (flushed)".into(), fmt_num(Some(written as f64 / MB)), fmt_num(ratio(written))]);
    t.row(vec!["bulk deleted, reclaimed".into(), fmt_num(Some(reclaimed as f64 / MB)), fmt_num(ratio(reclaimed))]);
    t.row(vec!["compacted".into(), fmt_num(Some(compacted as f64 / MB)), fmt_num(ratio(compacted))]);
    let max_round = round_secs.iter().max().map(|d: &Duration| d.as_secs_f64() * 1e3);

    println!();
    println!("busbar compaction bench, {}", utc_now());
    println!(
        "dir {}, BENCH_SCALE={scale}, apply version {version}: {batches} batches of {records_per_batch} x {record_bytes} B written in {write_secs:.1} s, {keep_k} in {keep_n} to keep ({:.1} MB live)",
        tmp.path().display(),
        live_payload as f64 / MB
    );
    println!();
    print!("{}", t.render());
    println!();
    println!(
        "compaction: {rounds} rounds in {secs:.2} s (longest {} ms), {files} files freed ({:.1} MB), {:.1} MB moved ({} MB/s), cpu {}% of one core",
        fmt_num(max_round),
        freed as f64 / MB,
        moved as f64 / MB,
        fmt_num(Some(moved as f64 / MB / secs.max(1e-9))),
        fmt_num(cpu.map(|c| 100.0 * c / secs.max(1e-9)))
    );
    println!("keep read back whole after compaction: {kept_records} records in {read_secs:.2} s");
    println!(
        "as written: batch files {:.1} MB ({:.0} B per batch), sled {:.1} MB ({:.0} B per batch), payload {:.1} MB",
        written_files as f64 / MB,
        written_files as f64 / batches as f64,
        written.saturating_sub(written_files) as f64 / MB,
        written.saturating_sub(written_files) as f64 / batches as f64,
        (batches * per_batch) as f64 / MB
    );
    Ok(())
}
