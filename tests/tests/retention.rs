//! Retention by time and size, decided by the leader and applied through the log: every node drops
//! exactly the same records, including a follower that was down when it happened.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busbar_client::codes;
use busbar_proto::v1 as pb;
use busbar_tests::inprocess::InProcessCluster;
use busbar_tests::wait;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn record(value: Vec<u8>, timestamp_ms: i64) -> pb::Record {
    pb::Record { key: None, value: value.into(), headers: vec![], timestamp_ms }
}

async fn offsets(c: &InProcessCluster, id: u64, topic: &str) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let client = c.client_of(id).await?;
    let d = client.describe_topic(topic).await?;
    Ok(d.partitions.iter().map(|p| (p.start_offset, p.end_offset, p.size_bytes)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_past_retention_ms_disappear_on_every_node_at_the_same_offsets() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic_with_config("old", 1, &[("retention.ms".into(), "60000".into())]).await?;
    // A follower is down while retention happens: it must apply the very same truncation later.
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    c.crash(follower).await?;

    let client = c.client().await?;
    let hour_ago = now_ms() - 3_600_000;
    for i in 0..3 {
        // Three old batches (two records each), then two fresh ones.
        let req = pb::ProduceRequest {
            topic: "old".into(),
            partition: Some(0),
            records: vec![
                record(format!("old{i}a").into_bytes(), hour_ago),
                record(format!("old{i}b").into_bytes(), hour_ago),
            ],
            producer_id: 0,
            sequence: 0,
        };
        client.produce_request(req).await?;
    }
    for i in 0..2 {
        let req = pb::ProduceRequest {
            topic: "old".into(),
            partition: Some(0),
            records: vec![record(format!("new{i}").into_bytes(), 0)],
            producer_id: 0,
            sequence: 0,
        };
        client.produce_request(req).await?;
    }
    // The leader drops exactly the three old batches: start offset 6, end 8.
    let running: Vec<u64> = c.ids();
    wait::until("retention to drop the old batches", Duration::from_secs(20), || async {
        for id in &running {
            if offsets(&c, *id, "old").await.ok()?[0].0 != 6 {
                return None;
            }
        }
        Some(())
    })
    .await?;
    for id in &running {
        assert_eq!(offsets(&c, *id, "old").await?[0].1, 8);
    }
    // Reading below the start gets OFFSET_OUT_OF_RANGE with the valid range.
    let Err(below) = client.fetch("old", 0, 2, 10).await else { panic!("a read below the start must fail") };
    assert_eq!(below.code(), Some(codes::OFFSET_OUT_OF_RANGE));
    assert!(below.to_string().contains("6..=8"), "{below}");
    // The follower comes back and holds the same start and the same records.
    c.restart(follower).await?;
    wait::until("the follower to apply the same retention", Duration::from_secs(30), || async {
        (offsets(&c, follower, "old").await.ok()?[0].0 == 6).then_some(())
    })
    .await?;
    c.wait_identical("old", 1, Duration::from_secs(30)).await?;
    let values: Vec<Vec<u8>> = c.dump(follower, "old", 0).await?.into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, vec![b"new0".to_vec(), b"new1".to_vec()]);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_under_retention_bytes_stays_under_it_plus_one_batch_while_writing() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    let limit: u64 = 64 * 1024;
    client.create_topic_with_config("capped", 1, &[("retention.bytes".into(), limit.to_string())]).await?;
    let mut max_batch = 0u64;
    let mut seen_over = 0u64;
    for i in 0..200u32 {
        let value = vec![(i % 251) as u8; 2048];
        let ack = client
            .produce_request(pb::ProduceRequest {
                topic: "capped".into(),
                partition: Some(0),
                records: vec![record(value, 0)],
                producer_id: 0,
                sequence: 0,
            })
            .await?;
        assert_eq!(ack.base_offset, u64::from(i));
        // One stored batch here is the 2 KiB record plus a little framing.
        max_batch = max_batch.max(2048 + 256);
        if i % 20 == 19 {
            let (_, _, bytes) = offsets(&c, c.leader().await?, "capped").await?[0];
            seen_over = seen_over.max(bytes);
        }
    }
    // Retention runs every 200 ms here while the writer keeps going: let it catch up, then the
    // bound must hold on every node.
    wait::until("every node within retention.bytes plus one batch", Duration::from_secs(20), || async {
        for id in c.ids() {
            let (start, end, bytes) = offsets(&c, id, "capped").await.ok()?[0];
            if bytes > limit + max_batch || start == 0 || end != 200 {
                return None;
            }
        }
        Some(())
    })
    .await?;
    c.wait_identical("capped", 1, Duration::from_secs(20)).await?;
    assert!(seen_over > 0);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topic_config_is_validated_altered_and_described_with_defaults() -> anyhow::Result<()> {
    let c = InProcessCluster::start(1).await?;
    let client = c.client().await?;
    let unknown = client.create_topic_with_config("t", 1, &[("retention.hours".into(), "1".into())]).await.err();
    assert_eq!(unknown.and_then(|e| e.code()), Some(40), "unknown key: INVALID_CONFIG");
    let bad = client.create_topic_with_config("t", 1, &[("retention.ms".into(), "soon".into())]).await.err();
    assert_eq!(bad.and_then(|e| e.code()), Some(40), "invalid value: INVALID_CONFIG");
    assert!(client.list_topics().await?.is_empty(), "a refused create writes nothing");

    client.create_topic_with_config("t", 1, &[("max.message.bytes".into(), "1000".into())]).await?;
    let d = client.describe_topic("t").await?;
    assert_eq!(d.topic_config.get("max.message.bytes").map(String::as_str), Some("1000"));
    // max.message.bytes is enforced per topic.
    let big = client
        .produce_request(pb::ProduceRequest {
            topic: "t".into(),
            partition: Some(0),
            records: vec![record(vec![0; 2000], 0)],
            producer_id: 0,
            sequence: 0,
        })
        .await
        .err();
    assert_eq!(big.and_then(|e| e.code()), Some(codes::RECORD_TOO_LARGE));
    let eff = client
        .alter_topic_config("t", &[("retention.ms".into(), "5000".into())], &["max.message.bytes".into()])
        .await?;
    assert_eq!(eff.get("retention.ms").map(String::as_str), Some("5000"));
    assert!(!eff.contains_key("max.message.bytes"));
    let bad_alter = client.alter_topic_config("t", &[("retention.bytes".into(), "-5".into())], &[]).await.err();
    assert_eq!(bad_alter.and_then(|e| e.code()), Some(40));
    c.shutdown().await;
    Ok(())
}
