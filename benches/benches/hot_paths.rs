//! Criterion micro-benchmarks of the write path's CPU hot spots, one layer at a time:
//!
//! - `proto`: a `ProduceRequest` of 100 records on the gRPC wire (prost encode / decode);
//! - `batch`: a batch as stored (`batch::encode` = record encoding + crc32 seal, `batch::decode`,
//!   `batch::decode_shared` as reads use it, `batch::summary`), in each record encoding (bincode,
//!   varint), and the crc32 envelope alone
//!   (`checked::seal` / `checked::open`);
//! - `wal`: `Wal::append` timed to its flush callback (one fdatasync per append, or shared by 8 in
//!   flight);
//! - `apply`: `TopicStore::apply` of produce commands into sled (no fsync, as in the server), at
//!   the newest apply version and its record encoding.
//!
//! Run: `cargo bench -p busbar-benches --bench hot_paths` (about 2 minutes); a filter narrows it,
//! e.g. `-- batch`. CI only compiles it. Files go where the `storage` bench puts them (`BENCH_DIR`,
//! else the target directory), never a tmpfs (fdatasync would cost nothing there).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use busbar_benches::{bench_root, random_bytes};
use busbar_proto::v1 as pb;
use busbar_storage::wal::{Wal, WalOptions};
use busbar_storage::{batch, checked, TopicStore, TopicStoreOptions};
use busbar_types::{Command, Record, RecordEncoding, TopicName};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;

const RECORDS: usize = 100;

fn records(size: usize) -> Vec<Record> {
    (0..RECORDS)
        .map(|i| Record {
            key: None,
            value: Bytes::from(random_bytes(size, i as u64 + 1)),
            headers: vec![],
            timestamp_ms: 1_700_000_000_000 + i as i64,
        })
        .collect()
}

fn scratch(name: &str) -> tempfile::TempDir {
    let root = bench_root().unwrap_or_else(|_| PathBuf::from("."));
    match tempfile::Builder::new().prefix(&format!("busbar-bench-{name}-")).tempdir_in(&root) {
        Ok(d) => d,
        Err(e) => panic!("cannot create a scratch directory in {}: {e}", root.display()),
    }
}

fn bench_proto(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto");
    for size in [100usize, 1024] {
        let req = pb::ProduceRequest {
            topic: "bench".into(),
            partition: Some(0),
            records: (0..RECORDS)
                .map(|i| pb::Record {
                    key: None,
                    value: random_bytes(size, i as u64).into(),
                    headers: vec![],
                    timestamp_ms: 0,
                })
                .collect(),
            producer_id: 7,
            sequence: 1,
        };
        // Decoded from `Bytes`, as tonic hands a message over: the values are then slices of it.
        let wire = Bytes::from(req.encode_to_vec());
        g.throughput(Throughput::Elements(RECORDS as u64));
        g.bench_function(format!("encode 100x{size}B"), |b| b.iter(|| black_box(&req).encode_to_vec()));
        g.bench_function(format!("decode 100x{size}B"), |b| {
            b.iter(|| pb::ProduceRequest::decode(black_box(wire.clone())))
        });
        // The same from a plain slice: a buffer and a copy per value, as before the fields were `Bytes`.
        g.bench_function(format!("decode copying 100x{size}B"), |b| {
            b.iter(|| pb::ProduceRequest::decode(black_box(&wire[..])))
        });
    }
    g.finish();
}

fn bench_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    let what = || "bench batch".to_string();
    for size in [100usize, 1024] {
        let recs = records(size);
        let mut stored = Vec::new();
        for (name, encoding) in [("bincode", RecordEncoding::Bincode), ("varint", RecordEncoding::Varint)] {
            stored = match batch::encode(&recs, encoding) {
                Ok(v) => v,
                Err(e) => panic!("encode: {e}"),
            };
            g.throughput(Throughput::Elements(RECORDS as u64));
            g.bench_function(format!("encode 100x{size}B {name}"), |b| {
                b.iter(|| batch::encode(black_box(&recs), encoding))
            });
            g.bench_function(format!("decode 100x{size}B {name}"), |b| {
                b.iter(|| batch::decode(&what, black_box(&stored)))
            });
            // What a read does: the records share the stored bytes (varint; bincode still copies).
            let shared = Bytes::from(stored.clone());
            g.bench_function(format!("decode shared 100x{size}B {name}"), |b| {
                b.iter(|| batch::decode_shared(&what, black_box(shared.clone())))
            });
            g.bench_function(format!("summary 100x{size}B {name}"), |b| {
                b.iter(|| batch::summary(&what, black_box(&stored)))
            });
        }
        g.throughput(Throughput::Bytes(stored.len() as u64));
        g.bench_function(format!("crc32 seal {}B", stored.len()), |b| b.iter(|| checked::seal(black_box(&stored))));
        let sealed = checked::seal(&stored);
        g.bench_function(format!("crc32 open {}B", stored.len()), |b| {
            b.iter(|| checked::open(&what, black_box(&sealed)))
        });
    }
    g.finish();
}

/// Appends of `entries` × `entry_bytes`, `in_flight` outstanding, timed until each callback.
fn bench_wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for (entries, entry_bytes, in_flight) in [(1usize, 1024usize, 1usize), (64, 1024, 1), (64, 1024, 8)] {
        let dir = scratch("wal");
        let wal = match Wal::open(dir.path(), WalOptions::default()) {
            Ok(w) => w,
            Err(e) => panic!("open wal: {e}"),
        };
        let payloads: Vec<Bytes> =
            (0..entries).map(|i| Bytes::from(random_bytes(entry_bytes, i as u64 + 11))).collect();
        let mut next = 1u64;
        g.throughput(Throughput::Bytes((entries * entry_bytes) as u64));
        g.bench_function(format!("append {entries}x{entry_bytes}B, {in_flight} in flight"), |b| {
            b.iter_custom(|iters| {
                let (tx, rx) = mpsc::channel::<std::io::Result<()>>();
                let start = Instant::now();
                let mut outstanding = 0usize;
                for _ in 0..iters {
                    if outstanding >= in_flight {
                        if let Ok(Err(e)) = rx.recv() {
                            panic!("fdatasync failed: {e}");
                        }
                        outstanding -= 1;
                    }
                    let batch: Vec<(u64, Bytes)> =
                        payloads.iter().enumerate().map(|(i, p)| (next + i as u64, p.clone())).collect();
                    next += entries as u64;
                    let tx = tx.clone();
                    if let Err(e) = wal.append(batch, Box::new(move |r| drop(tx.send(r)))) {
                        panic!("append: {e}");
                    }
                    outstanding += 1;
                }
                while outstanding > 0 {
                    if let Ok(Err(e)) = rx.recv() {
                        panic!("fdatasync failed: {e}");
                    }
                    outstanding -= 1;
                }
                start.elapsed()
            })
        });
        if let Err(e) = wal.close() {
            panic!("close wal: {e}");
        }
    }
    g.finish();
}

fn bench_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for (per_call, size) in [(1usize, 100usize), (16, 100), (1, 1024)] {
        let dir = scratch("apply");
        let store = match TopicStore::open(&dir.path().join("sled"), &TopicStoreOptions::default()) {
            Ok(s) => s,
            Err(e) => panic!("open store: {e}"),
        };
        let topic = match TopicName::new("bench") {
            Ok(t) => t,
            Err(e) => panic!("topic name: {e}"),
        };
        let create = Command::CreateTopic { name: topic.clone(), partitions: 4, config: Default::default() };
        let mut applied = 1u64;
        if let Err(e) = store.apply(&[Some(&create)], Bytes::copy_from_slice(&applied.to_be_bytes())) {
            panic!("create topic: {e}");
        }
        let version = busbar_storage::apply_version::APPLY_VERSION;
        if let Err(e) = store.apply(&[Some(&Command::SetApplyVersion { version })], Bytes::from_static(&[0; 8])) {
            panic!("apply version: {e}");
        }
        let encoding = busbar_storage::apply_version::record_encoding(version);
        let recs = match busbar_types::RecordBatch::encode(&records(size), encoding) {
            Ok(b) => b,
            Err(e) => panic!("encode: {e}"),
        };
        let produce: Vec<Command> = (0..4u32)
            .map(|p| Command::Produce { topic: topic.clone(), partition: p, records: recs.clone(), producer: None })
            .collect();
        let mut n = 0usize;
        g.throughput(Throughput::Elements((per_call * RECORDS) as u64));
        g.bench_function(format!("{per_call} x 100x{size}B per call"), |b| {
            b.iter_batched(
                || {
                    applied += 1;
                    let cmds: Vec<Option<&Command>> =
                        (0..per_call).map(|j| Some(&produce[(n * per_call + j) % produce.len()])).collect();
                    n += 1;
                    (cmds, Bytes::copy_from_slice(&applied.to_be_bytes()))
                },
                |(cmds, pos)| match store.apply(&cmds, pos) {
                    Ok(r) => r,
                    Err(e) => panic!("apply: {e}"),
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_proto, bench_batch, bench_wal, bench_apply);
criterion_main!(benches);
