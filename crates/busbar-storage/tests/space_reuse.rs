//! Deleting a topic frees its space for reuse: writing the same volume again after a delete (and
//! the reclaim that follows it) does not grow the store by that volume again. Measured here: 16 MiB
//! of records take 16-17 MiB (batch files, sled holds references); writing 16 MiB again after
//! deleting the first grows it by about 1 MiB, as the deleted topic's batch file is unlinked (it took
//! ~26 MiB and grew by 5-12 MiB while the batches lived in sled). The bound is three quarters of the
//! volume.

use busbar_storage::{TopicStore, TopicStoreOptions};
use busbar_types::{Command, Record, RecordBatch, RecordEncoding, TopicConfig, TopicName};
use bytes::Bytes;

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .map(
                    |e| {
                        if e.path().is_dir() {
                            dir_size(&e.path())
                        } else {
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    },
                )
                .sum()
        })
        .unwrap_or(0)
}

fn fill(store: &TopicStore, topic: &str, mib: usize) -> anyhow::Result<()> {
    let name = TopicName::new(topic)?;
    let create = Command::CreateTopic { name: name.clone(), partitions: 4, config: TopicConfig::default() };
    store.apply(&[Some(&create)], Bytes::from_static(b"c"))?;
    // 16 KiB batches of 16 x 1 KiB records.
    for i in 0..(mib * 64) {
        let records: Vec<Record> = (0..16)
            .map(|j| Record {
                key: None,
                value: Bytes::from(vec![(i + j) as u8; 1024]),
                headers: vec![],
                timestamp_ms: 1,
            })
            .collect();
        let records = RecordBatch::encode(&records, RecordEncoding::Bincode)?;
        let cmd = Command::Produce { topic: name.clone(), partition: (i % 4) as u32, records, producer: None };
        store.apply(&[Some(&cmd)], Bytes::from_static(b"p"))?;
    }
    store.flush_durable()?;
    Ok(())
}

#[test]
fn space_of_a_deleted_topic_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
    const MIB: usize = 16;
    fill(&store, "first", MIB).unwrap();
    let after_first = dir_size(dir.path());
    let delete = Command::DeleteTopic { name: TopicName::new("first").unwrap() };
    store.apply(&[Some(&delete)], Bytes::from_static(b"d")).unwrap();
    while store.reclaim(10_000).unwrap() > 0 {}
    store.flush_durable().unwrap();
    fill(&store, "second", MIB).unwrap();
    let after_second = dir_size(dir.path());
    eprintln!("after first: {} MiB, after second: {} MiB", after_first >> 20, after_second >> 20);
    let grown = after_second.saturating_sub(after_first);
    // Without reuse the second write would take about what the first took (22-23 MiB here); with
    // it, the store grew 5-12 MiB over 8 runs (before and after 2026-11-28: sled's cleaning depends
    // on timing). The bound sits between the two, relative to the first write, so a loaded machine
    // does not fail it and a store that stopped reusing space still does.
    assert!(
        grown < after_first * 3 / 4,
        "writing {MIB} MiB again after deleting {MIB} MiB grew the store by {} MiB (the first write took {} MiB)",
        grown >> 20,
        after_first >> 20
    );
}
