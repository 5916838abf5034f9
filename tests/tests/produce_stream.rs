//! The raw gRPC API where the Rust client does not reach: the pipelined produce stream, and brokers
//! that are down in the client's list.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use busbar_client::{Client, ClientOptions, Record};
use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_client::BusbarClient;
use busbar_tests::inprocess::InProcessCluster;
use tokio_stream::StreamExt;

fn batch(topic: &str, partition: u32, producer_id: u64, sequence: u64, value: &str) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        records: vec![pb::Record {
            key: None,
            value: value.as_bytes().to_vec().into(),
            headers: vec![],
            timestamp_ms: 0,
        }],
        producer_id,
        sequence,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_stream_acks_every_batch_in_order_and_a_bad_batch_does_not_end_it() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("s", 2).await?;
    let pid = client.init_producer_id().await?;
    let leader = c.leader().await?;
    let mut grpc = BusbarClient::connect(format!("http://{}", c.addr(leader))).await?;

    // 200 pipelined batches over two partitions, sequences per partition, one bad batch in the middle.
    let mut reqs = Vec::new();
    let mut seq = [0u64; 2];
    for i in 0..200u64 {
        let p = (i % 2) as u32;
        reqs.push(pb::ProduceStreamRequest {
            request_id: i,
            batch: Some(batch("s", p, pid, seq[p as usize], &format!("v{i}"))),
        });
        seq[p as usize] += 1;
        if i == 100 {
            reqs.push(pb::ProduceStreamRequest {
                request_id: 10_000,
                batch: Some(batch("no-such-topic", 0, 0, 0, "x")),
            });
        }
    }
    let mut acks = grpc.produce_stream(tokio_stream::iter(reqs)).await?.into_inner();
    let mut got: BTreeMap<u64, pb::produce_stream_response::Result> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 201 {
        let next = tokio::time::timeout_at(deadline.into(), acks.next()).await?;
        let Some(msg) = next else { break };
        let msg = msg?;
        let result = msg.result.ok_or_else(|| anyhow::anyhow!("response without result"))?;
        assert!(got.insert(msg.request_id, result).is_none(), "request {} answered twice", msg.request_id);
    }
    assert_eq!(got.len(), 201, "one answer per batch");
    match got.remove(&10_000) {
        Some(pb::produce_stream_response::Result::Error(e)) => assert_eq!(e.code, 3, "unknown topic: {e:?}"),
        other => panic!("the bad batch got {other:?}"),
    }
    // Batches of a partition were proposed in arrival order: offsets follow request order.
    for p in 0..2u32 {
        let offsets: Vec<u64> = got
            .iter()
            .filter(|(id, _)| (*id % 2) as u32 == p)
            .map(|(id, r)| match r {
                pb::produce_stream_response::Result::Ack(a) => {
                    assert_eq!(a.partition, p);
                    assert!(!a.duplicate);
                    a.base_offset
                }
                pb::produce_stream_response::Result::Error(e) => panic!("request {id} failed: {e:?}"),
            })
            .collect();
        assert_eq!(offsets, (0..100).collect::<Vec<u64>>(), "partition {p}");
    }
    // Re-sending a recent (producer, sequence) batch answers with its original offsets; one older
    // than the remembered window is refused (46), not written again.
    let again = vec![
        pb::ProduceStreamRequest { request_id: 1, batch: Some(batch("s", 1, pid, 99, "v199")) },
        pb::ProduceStreamRequest { request_id: 2, batch: Some(batch("s", 1, pid, 0, "v1")) },
    ];
    let mut acks = grpc.produce_stream(tokio_stream::iter(again)).await?.into_inner();
    let mut answers = BTreeMap::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), acks.next()).await?.transpose()? {
        answers.insert(m.request_id, m.result);
        if answers.len() == 2 {
            break;
        }
    }
    match answers.remove(&1).flatten() {
        Some(pb::produce_stream_response::Result::Ack(a)) => assert!(a.duplicate && a.base_offset == 99, "{a:?}"),
        other => panic!("retry got {other:?}"),
    }
    match answers.remove(&2).flatten() {
        Some(pb::produce_stream_response::Result::Error(e)) => assert_eq!(e.code, 46, "{e:?}"),
        other => panic!("old retry got {other:?}"),
    }
    // list_offsets is linearizable: it sees every acknowledged batch, and the retries wrote nothing.
    let total = client.list_offsets("s").await?.iter().map(|p| p.end_offset).sum::<u64>();
    assert_eq!(total, 200, "the retried batches wrote nothing");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_broker_in_the_list_costs_one_bounded_connect_not_a_failed_command() -> anyhow::Result<()> {
    let c = InProcessCluster::start(1).await?;
    // A port nothing listens on, first in the list.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let opts = ClientOptions { connect_timeout: Duration::from_millis(500), ..ClientOptions::default() };
    let started = Instant::now();
    let client = Client::connect_with([dead.clone(), c.addr(1)], opts).await?;
    client.create_topic("d", 1).await?;
    let ack = client.produce("d", 0, vec![Record::value("hello")]).await?;
    assert_eq!(ack.base_offset, 0);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // Every broker down: a clear error, within a bounded time, not a hang.
    let started = Instant::now();
    let none = Client::connect_with(
        [dead],
        ClientOptions { connect_timeout: Duration::from_millis(300), ..ClientOptions::default() },
    )
    .await;
    assert!(none.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_is_not_held_up_by_open_subscriptions_or_long_polls() -> anyhow::Result<()> {
    let c = InProcessCluster::start(1).await?;
    let client = c.client().await?;
    client.create_topic("w", 1).await?;
    let mut grpc = BusbarClient::connect(format!("http://{}", c.addr(1))).await?;
    let mut sub = grpc
        .subscribe(pb::SubscribeRequest { topic: "w".into(), partition: 0, offset: 0, max_records: 0, max_bytes: 0 })
        .await?
        .into_inner();
    let poll = tokio::spawn({
        let client = client.clone();
        async move { client.fetch_wait("w", 0, 0, 10, Duration::from_secs(25)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await?;
    assert!(started.elapsed() < Duration::from_secs(10));
    // The long poll was answered (empty), and the subscription ended with SHUTTING_DOWN.
    let polled = tokio::time::timeout(Duration::from_secs(5), poll).await??;
    assert!(polled.map(|r| r.records.is_empty()).unwrap_or(true));
    let ended = tokio::time::timeout(Duration::from_secs(5), sub.next()).await?;
    match ended {
        Some(Err(st)) => {
            assert_eq!(st.metadata().get(busbar_proto::ERROR_CODE_KEY).and_then(|v| v.to_str().ok()), Some("1002"))
        }
        None => {}
        Some(Ok(m)) => panic!("unexpected message {m:?}"),
    }
    Ok(())
}
