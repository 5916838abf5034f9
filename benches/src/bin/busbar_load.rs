//! `busbar-load`: drives a running Busbar cluster (through `busbar-client`) or a NATS JetStream
//! cluster (through `async-nats`) with the same workload and measures both with the same code.
//!
//! Producers send records of a fixed size, either as fast as a bounded number of outstanding
//! requests allows (`--mode throughput`) or at a fixed offered rate (`--mode rate`); consumers tail
//! the partitions. `--mode consume` first writes `--consume-records` records, then reads them all
//! back from the start of their partitions and reports the read rate.
//!
//! Every record carries, in its first 8 bytes, the time it was *scheduled* to be sent (nanoseconds
//! since the run's start). Produce-to-ack and end-to-end latencies are measured from that time, so a
//! sender that falls behind its schedule (a stalled server, a full in-flight window) shows up in the
//! latencies instead of silently lowering the offered load (coordinated omission).
//!
//! Output: a human summary, then one JSON object on the last line of standard output.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use busbar_benches::{fill_random, process_ticks, status_kb, CpuSample};
use busbar_client::{
    Admin, Client, GroupConsumer, GroupConsumerConfig, PartitionConsumer, Producer, ProducerConfig, Record, StartFrom,
};
use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_client::BusbarClient;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::stream::{FuturesUnordered, SelectAll};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Busbar,
    Nats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// As fast as `--in-flight` outstanding records per producer allow.
    Throughput,
    /// A fixed offered rate (`--rate` records/s over all producers); latency from the schedule.
    Rate,
    /// Write `--consume-records`, then read them back from the start; reports the read rate.
    Consume,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Api {
    /// Busbar: `Producer` batching per partition (`--linger-ms`, `--max-batch-bytes`).
    /// NATS: asynchronous publishes (JetStream has no client-side batching).
    Batched,
    /// One record per request: Busbar `Produce` RPCs of one record each, NATS publishes; up to
    /// `--in-flight` outstanding per producer in both.
    PerRequest,
    /// One record per request, Busbar's requests as messages on one `ProduceStream` per producer
    /// (what a client sending records one by one with many outstanding would use; one ack per
    /// record). NATS: publishes, as in per-request.
    PerRequestStream,
    /// One record per request through `busbar_client::Client::produce` (leader redirects,
    /// retries, the client's kept connections): what an application writing one record at a time
    /// calls. NATS: publishes, as in per-request.
    ClientProduce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConsumeWith {
    /// One `PartitionConsumer` stream (Subscribe) per partition, partitions dealt to consumers.
    Partition,
    /// `GroupConsumer`s in one consumer group.
    Group,
}

#[derive(Parser, Clone, Debug)]
#[command(
    args_override_self = true,
    about = "Load generator for Busbar and NATS JetStream: throughput, latency (HDR, CO-corrected), consume rate"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = System::Busbar)]
    system: System,
    /// Busbar brokers (HOST:PORT) or NATS servers (nats://HOST:PORT), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9501")]
    brokers: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Throughput)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = Api::Batched)]
    api: Api,
    /// Producer tasks (each with its own connection).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumer tasks (0: none; no end-to-end latency then).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, value_enum, default_value_t = ConsumeWith::Partition)]
    consume_with: ConsumeWith,
    /// Bytes of each record's value (at least 8: the send timestamp).
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Give records keys (16 bytes, from a set of 1024); they pick the partition (murmur2).
    #[arg(long)]
    keyed: bool,
    /// Partitions of the topic (Busbar) / subjects of the stream (NATS).
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Busbar Producer: how long a batch waits for more records.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Busbar Producer: batch size limit.
    #[arg(long, default_value_t = 256 << 10)]
    max_batch_bytes: usize,
    /// Records (batched) or requests (per-request, NATS) outstanding per producer at most.
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
    /// Offered records/s over all producers (mode rate).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Upper bound on waiting for outstanding acks and consumers after the run.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Records written and read back in mode consume.
    #[arg(long, default_value_t = 1_000_000)]
    consume_records: u64,
    /// Topic (Busbar) / stream (NATS) name; default: a fresh one per run.
    #[arg(long)]
    topic: Option<String>,
    /// NATS stream replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Server process ids: their CPU time over the measured window and peak RSS are reported.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// A label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

/// Latencies are recorded in microseconds, up to 10 minutes, 3 significant digits.
fn new_hist() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

/// What every task shares: the clock base, the measured window and the counters.
struct Shared {
    base: Instant,
    /// Measured window, in ns since `base`.
    from_ns: u64,
    until_ns: u64,
    acked: AtomicU64,
    consumed: AtomicU64,
    /// Records acknowledged over the whole run (warm-up and drain included).
    acked_total: AtomicU64,
    consumed_total: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
    fn in_window(&self, ns: u64) -> bool {
        ns >= self.from_ns && ns < self.until_ns
    }
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        // The first few are worth reading; after that the count says enough.
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("busbar-load: {what}: {e}");
        }
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One producer's way of sending one record; returns once the record is handed over (so the
/// sender may be throttled by the client's own buffer), with a future for its acknowledgement.
enum Sink {
    Busbar { producer: Arc<Producer>, topic: String },
    BusbarRaw { api: BusbarClient<Channel>, topic: String },
    BusbarStream(ProduceStreamSink),
    BusbarClient { client: Client, topic: String },
    Nats { js: async_nats::jetstream::Context, prefix: String },
}

impl Sink {
    async fn send(&self, partition: u32, key: Option<Vec<u8>>, value: Vec<u8>) -> Result<AckFuture> {
        match self {
            // Its acks are followed by callback, in `produce`, not by a future per record.
            Sink::Busbar { .. } => bail!("the Busbar Producer sink is driven by produce's callback path"),
            Sink::BusbarRaw { api, topic } => {
                let req = pb::ProduceRequest {
                    topic: topic.clone(),
                    partition: Some(partition),
                    records: vec![pb::Record {
                        key: key.map(Bytes::from),
                        value: value.into(),
                        headers: vec![],
                        timestamp_ms: 0,
                    }],
                    producer_id: 0,
                    sequence: 0,
                };
                let mut api = api.clone();
                Ok(Box::pin(async move {
                    api.produce(req).await.map_err(|s| anyhow!("produce: {} {}", s.code(), s.message()))?;
                    Ok(())
                }))
            }
            Sink::BusbarStream(sink) => sink.send(partition, key, value).await,
            Sink::BusbarClient { client, topic } => {
                let record = busbar_client::Record { key, value, ..Default::default() };
                let (client, topic) = (client.clone(), topic.clone());
                Ok(Box::pin(async move {
                    client.produce(&topic, partition, vec![record]).await.map_err(|e| anyhow!("produce: {e}"))?;
                    Ok(())
                }))
            }
            Sink::Nats { js, prefix } => {
                let subject = format!("{prefix}.{partition}");
                let ack = match key {
                    // The key travels as a header, as a NATS user would carry it.
                    Some(k) => {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("key", String::from_utf8_lossy(&k).as_ref());
                        js.publish_with_headers(subject, h, value.into()).await?
                    }
                    None => js.publish(subject, value.into()).await?,
                };
                Ok(Box::pin(async move {
                    ack.await?;
                    Ok(())
                }))
            }
        }
    }
}

/// One `ProduceStream` to the leader: each record is one message with its own request id, and a
/// reader task hands each ack to the record's waiter.
struct ProduceStreamSink {
    requests: tokio::sync::mpsc::Sender<pb::ProduceStreamRequest>,
    waiters: Arc<std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<()>>>>>,
    next_id: AtomicU64,
    topic: String,
}

impl ProduceStreamSink {
    async fn open(mut api: BusbarClient<Channel>, topic: &str, in_flight: usize) -> Result<Self> {
        let (requests, rx) = tokio::sync::mpsc::channel(in_flight.max(1));
        let mut acks = api.produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let waiters: Arc<std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Result<()>>>>> =
            Arc::default();
        let w = waiters.clone();
        tokio::spawn(async move {
            let fail_all = |why: String| {
                for (_, tx) in w.lock().map(|mut m| m.drain().collect::<Vec<_>>()).unwrap_or_default() {
                    let _ = tx.send(Err(anyhow!("{why}")));
                }
            };
            loop {
                match acks.message().await {
                    Ok(Some(msg)) => {
                        let tx = w.lock().ok().and_then(|mut m| m.remove(&msg.request_id));
                        let outcome = match msg.result {
                            Some(pb::produce_stream_response::Result::Ack(_)) => Ok(()),
                            Some(pb::produce_stream_response::Result::Error(e)) => {
                                Err(anyhow!("produce: code {} {}", e.code, e.message))
                            }
                            None => Err(anyhow!("produce stream: an answer without a result")),
                        };
                        if let Some(tx) = tx {
                            let _ = tx.send(outcome);
                        }
                    }
                    Ok(None) => return fail_all("the produce stream ended".into()),
                    Err(st) => return fail_all(format!("produce stream: {} {}", st.code(), st.message())),
                }
            }
        });
        Ok(Self { requests, waiters, next_id: AtomicU64::new(0), topic: topic.to_string() })
    }

    async fn send(&self, partition: u32, key: Option<Vec<u8>>, value: Vec<u8>) -> Result<AckFuture> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.lock().map_err(|_| anyhow!("waiters poisoned"))?.insert(request_id, tx);
        let batch = pb::ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(partition),
            records: vec![pb::Record {
                key: key.map(Bytes::from),
                value: value.into(),
                headers: vec![],
                timestamp_ms: 0,
            }],
            producer_id: 0,
            sequence: 0,
        };
        self.requests
            .send(pb::ProduceStreamRequest { request_id, batch: Some(batch) })
            .await
            .map_err(|_| anyhow!("the produce stream is closed"))?;
        Ok(Box::pin(async move { rx.await.map_err(|_| anyhow!("the produce stream ended"))? }))
    }
}

/// A leader channel for the per-request Busbar path: one HTTP/2 connection per producer, kept open
/// (the `Client` calls connect per call, which would measure connection setup instead).
async fn busbar_leader_api(brokers: &[String]) -> Result<BusbarClient<Channel>> {
    let client = Client::connect(brokers.to_vec()).await?;
    let md = client.metadata().await?;
    if !md.has_leader {
        bail!("the cluster has no leader");
    }
    let ep = Endpoint::from_shared(format!("http://{}", md.leader_addr))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30));
    let ch = tokio::time::timeout(Duration::from_secs(5), ep.connect()).await.context("connect timed out")??;
    Ok(BusbarClient::new(ch))
}

async fn nats_connect(servers: &[String], in_flight: usize) -> Result<async_nats::jetstream::Context> {
    let addrs: Vec<async_nats::ServerAddr> =
        servers.iter().map(|s| s.parse()).collect::<Result<_, _>>().context("a NATS server address")?;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .context("connecting to NATS")?;
    Ok(async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        // We bound outstanding publishes ourselves; leave the client's own bound above ours.
        .max_ack_inflight(in_flight + 16)
        .build(client))
}

/// Creates the topic (Busbar) or stream (NATS) fresh.
async fn setup(args: &Args, topic: &str) -> Result<()> {
    match args.system {
        System::Busbar => {
            let admin = Admin::connect(args.brokers.clone()).await?;
            admin.create_topic(topic, args.partitions).await?;
            // A follower applies the creation a moment later; wait until every broker knows it.
            for b in &args.brokers {
                let c = Client::connect([b.clone()]).await?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while c.describe_topic(topic).await.is_err() {
                    if Instant::now() > deadline {
                        bail!("{b} does not know topic {topic} after 10 s");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        System::Nats => {
            let js = nats_connect(&args.brokers, 16).await?;
            let _ = js.delete_stream(topic).await;
            let config = async_nats::jetstream::stream::Config {
                name: topic.to_string(),
                subjects: vec![format!("{topic}.>")],
                num_replicas: args.replicas,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            };
            // A cluster that has just started may not have elected its meta leader yet.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match js.create_stream(config.clone()).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("busbar-load: creating stream {topic}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => bail!("creating stream {topic}: {e}"),
                }
            }
        }
    }
    Ok(())
}

async fn make_sink(args: &Args, topic: &str) -> Result<Sink> {
    Ok(match (args.system, args.api) {
        (System::Busbar, Api::Batched) => {
            let client = Client::connect(args.brokers.clone()).await?;
            let cfg = ProducerConfig {
                linger: Duration::from_millis(args.linger_ms),
                max_batch_bytes: args.max_batch_bytes,
                // The buffer bounds what one producer holds: in-flight records plus one batch.
                max_buffer_bytes: (args.in_flight * (args.record_size + 64)).max(args.max_batch_bytes * 2),
                // A benchmark record is written once: leave idempotence on, as users get it.
                ..ProducerConfig::default()
            };
            Sink::Busbar { producer: Arc::new(Producer::new(client, cfg).await?), topic: topic.to_string() }
        }
        (System::Busbar, Api::PerRequest) => {
            Sink::BusbarRaw { api: busbar_leader_api(&args.brokers).await?, topic: topic.to_string() }
        }
        (System::Busbar, Api::ClientProduce) => {
            Sink::BusbarClient { client: Client::connect(args.brokers.clone()).await?, topic: topic.to_string() }
        }
        (System::Busbar, Api::PerRequestStream) => Sink::BusbarStream(
            ProduceStreamSink::open(busbar_leader_api(&args.brokers).await?, topic, args.in_flight).await?,
        ),
        (System::Nats, _) => {
            Sink::Nats { js: nats_connect(&args.brokers, args.in_flight).await?, prefix: topic.to_string() }
        }
    })
}

/// What one producer measured.
struct ProducerOut {
    ack: Histogram<u64>,
}

/// When one producer sends: from `start_ns` every `interval_ns` (0: as fast as it can) until
/// `stop_ns`, or `limit` records.
#[derive(Clone, Copy)]
struct Schedule {
    start_ns: u64,
    stop_ns: u64,
    interval_ns: f64,
    limit: Option<u64>,
}

/// An acknowledgement to wait for, with the time its record was scheduled.
type Pending = Pin<Box<dyn Future<Output = (u64, Result<()>)> + Send>>;

/// Sends until `stop_ns` (or `limit` records), keeping at most `in_flight` unacknowledged.
/// `interval_ns`: the schedule in mode rate (0: as fast as possible).
async fn produce(sh: Arc<Shared>, sink: Sink, args: Args, index: usize, sched: Schedule) -> Result<ProducerOut> {
    let Schedule { start_ns, stop_ns, interval_ns, limit } = sched;
    let mut ack = new_hist()?;
    let mut template = vec![0u8; args.record_size.max(8)];
    fill_random(&mut template, index as u64 + 1);
    let keys: Vec<Vec<u8>> = (0..1024u64).map(|k| format!("key-{index:04}-{k:06}").into_bytes()).collect();
    // Acks to wait for: futures (NATS, Busbar per request), or, for Busbar's Producer, callbacks
    // that hand back an in-flight slot. A future per record costs the load generator more CPU than
    // a Busbar node spends on the record (FuturesUnordered's wake-ups), CPU this machine's servers
    // then lack; the callback is what a Busbar client following many records uses.
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let settle = |(sent_ns, r): (u64, Result<()>), ack: &mut Histogram<u64>| settle_ack(&sh, sent_ns, r, ack);
    let mut i: u64 = 0;
    let in_flight = args.in_flight.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let callback_acks = Arc::new(std::sync::Mutex::new(new_hist()?));
    loop {
        if limit.is_some_and(|l| i >= l) || sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let scheduled = if interval_ns > 0.0 {
            let at = start_ns + (i as f64 * interval_ns) as u64;
            if at >= stop_ns {
                break;
            }
            let now = sh.now_ns();
            if at > now {
                // Wait for the schedule, settling acks meanwhile.
                let wake = sh.base + Duration::from_nanos(at);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => break,
                        Some(done) = pending.next(), if !pending.is_empty() => settle(done, &mut ack),
                    }
                }
            }
            at
        } else {
            let now = sh.now_ns();
            if now >= stop_ns && limit.is_none() {
                break;
            }
            now
        };
        while pending.len() >= in_flight {
            if let Some(done) = pending.next().await {
                settle(done, &mut ack);
            }
        }
        let mut value = template.clone();
        value[..8].copy_from_slice(&scheduled.to_le_bytes());
        let key = args.keyed.then(|| keys[(i as usize * 7919 + index) % keys.len()].clone());
        let partition = match &key {
            Some(k) => busbar_proto::partition::for_key(k, args.partitions),
            None => ((i + index as u64) % u64::from(args.partitions.max(1))) as u32,
        };
        let sent = match &sink {
            Sink::Busbar { producer, topic } => {
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                let (sh, acks) = (sh.clone(), callback_acks.clone());
                let record = match key {
                    Some(k) => Record::keyed(k, value),
                    None => Record::value(value),
                };
                let done = move |r: Result<busbar_client::RecordMetadata, busbar_client::ClientError>| {
                    let mut acks = acks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    settle_ack(&sh, scheduled, r.map(|_| ()).map_err(anyhow::Error::from), &mut acks);
                    drop(slot);
                };
                producer.send_with_callback(topic, record, done).await.map_err(anyhow::Error::from)
            }
            _ => sink.send(partition, key, value).await.map(|fut| {
                pending.push(Box::pin(async move { (scheduled, fut.await) }));
            }),
        };
        match sent {
            Ok(()) => {}
            Err(e) => {
                sh.error("send", e);
                // A refused send (client closed, server gone) would spin: back off a little.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        i += 1;
    }
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
    while !pending.is_empty() {
        match tokio::time::timeout_at(drain_until, pending.next()).await {
            Ok(Some(done)) => settle(done, &mut ack),
            Ok(None) => break,
            Err(_) => {
                sh.error("drain", format!("{} records unacknowledged after the drain timeout", pending.len()));
                break;
            }
        }
    }
    if matches!(sink, Sink::Busbar { .. })
        && tokio::time::timeout_at(drain_until, slots.acquire_many(in_flight as u32)).await.is_err()
    {
        sh.error(
            "drain",
            format!("{} records unacknowledged after the drain timeout", in_flight - slots.available_permits()),
        );
    }
    if let Sink::Busbar { producer, .. } = &sink {
        let _ = tokio::time::timeout(Duration::from_secs(5), producer.close()).await;
    }
    ack.add(&*callback_acks.lock().unwrap_or_else(std::sync::PoisonError::into_inner))?;
    Ok(ProducerOut { ack })
}

/// Counts an acknowledgement (or reports its error); its latency is recorded when the record was
/// scheduled inside the measured window.
fn settle_ack(sh: &Shared, sent_ns: u64, r: Result<()>, ack: &mut Histogram<u64>) {
    let now = sh.now_ns();
    match r {
        Ok(()) => {
            sh.acked_total.fetch_add(1, Ordering::Relaxed);
            if sh.in_window(now) {
                sh.acked.fetch_add(1, Ordering::Relaxed);
            }
            if sh.in_window(sent_ns) {
                let _ = ack.record(now.saturating_sub(sent_ns) / 1000);
            }
        }
        Err(e) => sh.error("produce", e),
    }
}

/// A stream of consumed record values, whatever the system.
// Values as the clients hand them over, without a copy on either side (Busbar's and NATS's are `Bytes`).
type ValueStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes>> + Send>>;

async fn consumer_streams(args: &Args, topic: &str, index: usize, run_id: &str) -> Result<Vec<ValueStream>> {
    let mine: Vec<u32> = (0..args.partitions).filter(|p| (*p as usize) % args.consumers == index).collect();
    let mut out: Vec<ValueStream> = Vec::new();
    match (args.system, args.consume_with) {
        (System::Busbar, ConsumeWith::Partition) => {
            let client = Client::connect(args.brokers.clone()).await?;
            for p in mine {
                let mut c = PartitionConsumer::new(client.clone());
                c.assign(topic, p).await?;
                out.push(Box::pin(c.stream().map(|r| r.map(|r| r.value).map_err(anyhow::Error::from))));
            }
        }
        (System::Busbar, ConsumeWith::Group) => {
            let client = Client::connect(args.brokers.clone()).await?;
            let mut cfg = GroupConsumerConfig::new(format!("bench-{run_id}"), [topic.to_string()]);
            cfg.start = StartFrom::Earliest;
            cfg.max_poll_records = 5000;
            let g = GroupConsumer::subscribe(client, cfg).await?;
            out.push(Box::pin(g.map(|r| r.map(|r| r.value).map_err(anyhow::Error::from))));
        }
        (System::Nats, _) => {
            if mine.is_empty() {
                return Ok(out);
            }
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            let js = nats_connect(&args.brokers, 16).await?;
            let stream = js.get_stream(topic).await.map_err(|e| anyhow!("stream {topic}: {e}"))?;
            let config = pull::Config {
                deliver_policy: DeliverPolicy::All,
                // Busbar consumers acknowledge nothing either: reading is measured, not acking.
                ack_policy: AckPolicy::None,
                filter_subjects: mine.iter().map(|p| format!("{topic}.{p}")).collect(),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            };
            // The stream's consumer API can time out while its Raft group settles: retry, bounded.
            let deadline = Instant::now() + Duration::from_secs(30);
            let consumer = loop {
                match stream.create_consumer(config.clone()).await {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("busbar-load: creating consumer: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => bail!("creating consumer: {e}"),
                }
            };
            let msgs = consumer
                .stream()
                .max_messages_per_batch(5000)
                .messages()
                .await
                .map_err(|e| anyhow!("consumer messages: {e}"))?;
            out.push(Box::pin(msgs.map(|m| m.map(|m| m.message.payload).map_err(|e| anyhow!("{e}")))));
        }
    }
    Ok(out)
}

/// Reads until `stop` is set (and nothing more arrives for a moment) or `target` records were read.
async fn consume(sh: Arc<Shared>, streams: Vec<ValueStream>, target: Option<Arc<AtomicU64>>) -> Result<Histogram<u64>> {
    let mut e2e = new_hist()?;
    let mut all: SelectAll<ValueStream> = futures::stream::select_all(streams);
    loop {
        let next = tokio::time::timeout(Duration::from_millis(200), all.next()).await;
        let now = sh.now_ns();
        match next {
            Ok(Some(Ok(v))) => {
                let total = sh.consumed_total.fetch_add(1, Ordering::Relaxed) + 1;
                if sh.in_window(now) {
                    sh.consumed.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(ts) = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
                    // Reading back old records (mode consume) says nothing about end-to-end latency.
                    if target.is_none() && sh.in_window(ts) {
                        let _ = e2e.record(now.saturating_sub(ts) / 1000);
                    }
                }
                if target.as_ref().is_some_and(|t| total >= t.load(Ordering::Relaxed)) {
                    sh.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
            Ok(Some(Err(e))) => {
                sh.error("consume", e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    Ok(e2e)
}

fn quantiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |v: u64| v as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "p9999_ms": ms(h.value_at_quantile(0.9999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

fn human(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{name:<18} (no samples)");
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name:<18} n={:<9} p50 {:.3}  p99 {:.3}  p99.9 {:.3}  p99.99 {:.3}  max {:.3} ms",
        h.len(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        ms(0.9999),
        h.max() as f64 / 1000.0
    )
}

fn pids_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| process_ticks(*p).ok()).sum()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.producers == 0 || args.partitions == 0 || args.record_size < 8 {
        bail!("--producers and --partitions must be above 0 and --record-size at least 8");
    }
    if args.mode == Mode::Rate && args.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let run_id = format!("{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() % 1_000_000);
    let topic = args.topic.clone().unwrap_or_else(|| match args.system {
        System::Busbar => format!("bench-{run_id}"),
        System::Nats => format!("BENCH_{}", run_id.replace('-', "_")),
    });
    setup(&args, &topic).await.context("creating the topic / stream")?;

    let base = Instant::now();
    let warm = Duration::from_secs_f64(args.warmup);
    let dur = Duration::from_secs_f64(args.duration);
    let consume_mode = args.mode == Mode::Consume;
    let (from_ns, until_ns) = if consume_mode {
        (0, u64::MAX) // the write phase is timed as a whole
    } else {
        (warm.as_nanos() as u64, (warm + dur).as_nanos() as u64)
    };
    let sh = Arc::new(Shared {
        base,
        from_ns,
        until_ns,
        acked: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        acked_total: AtomicU64::new(0),
        consumed_total: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    // Consumers first (tailing from the start of each partition), except in mode consume.
    let mut consumers = Vec::new();
    if !consume_mode {
        for c in 0..args.consumers {
            let streams = consumer_streams(&args, &topic, c, &run_id).await?;
            consumers.push(tokio::spawn(consume(sh.clone(), streams, None)));
        }
    }

    // The measured window's CPU, steal and wall time, sampled by a task of its own.
    let sampler = {
        let sh = sh.clone();
        let pids = args.pids.clone();
        tokio::spawn(async move {
            if !consume_mode {
                tokio::time::sleep_until(sh.base + Duration::from_nanos(sh.from_ns)).await;
            }
            let (t0, c0, s0) = (Instant::now(), pids_ticks(&pids), CpuSample::now().ok());
            if consume_mode {
                while !sh.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                tokio::time::sleep_until(sh.base + Duration::from_nanos(sh.until_ns)).await;
            }
            let (t1, c1, s1) = (Instant::now(), pids_ticks(&pids), CpuSample::now().ok());
            let (steal, own) = match (s0, s1) {
                (Some(a), Some(b)) => (a.steal_pct(&b), a.process_secs(&b)),
                _ => (f64::NAN, f64::NAN),
            };
            (t1 - t0, c1.saturating_sub(c0) as f64 / busbar_benches::USER_HZ, steal, own)
        })
    };

    let mut producers = Vec::new();
    let limit_each = consume_mode.then(|| args.consume_records.div_ceil(args.producers as u64));
    let stop_ns = if consume_mode { u64::MAX } else { until_ns };
    let interval_ns = if args.mode == Mode::Rate { 1e9 * args.producers as f64 / args.rate } else { 0.0 };
    for p in 0..args.producers {
        let sink = make_sink(&args, &topic).await?;
        // Producers start staggered across one interval, so their schedules interleave.
        let start_ns = sh.now_ns() + (interval_ns * p as f64 / args.producers as f64) as u64;
        producers.push(tokio::spawn(produce(
            sh.clone(),
            sink,
            args.clone(),
            p,
            Schedule { start_ns, stop_ns, interval_ns, limit: limit_each },
        )));
    }
    let produce_started = Instant::now();
    let mut ack = new_hist()?;
    for p in producers {
        let out = p.await.map_err(|e| anyhow!("producer task: {e}"))??;
        ack.add(&out.ack).map_err(|e| anyhow!("histogram: {e}"))?;
    }
    let produce_elapsed = produce_started.elapsed();

    // Mode consume: the records are committed; now read them all back from the start.
    let mut consume_secs = f64::NAN;
    if consume_mode {
        let target = Arc::new(AtomicU64::new(sh.acked_total.load(Ordering::Relaxed)));
        let t = Instant::now();
        for c in 0..args.consumers.max(1) {
            let streams = consumer_streams(&args, &topic, c, &run_id).await?;
            consumers.push(tokio::spawn(consume(sh.clone(), streams, Some(target.clone()))));
        }
        let bound = Duration::from_secs_f64(args.drain_timeout);
        let until = t + bound;
        while !sh.stop.load(Ordering::Relaxed) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        consume_secs = t.elapsed().as_secs_f64();
        sh.stop.store(true, Ordering::Relaxed);
    } else {
        // Let consumers catch up with what was acknowledged, within the drain bound.
        let until = Instant::now() + Duration::from_secs_f64(args.drain_timeout.min(10.0));
        while sh.consumed_total.load(Ordering::Relaxed) < sh.acked_total.load(Ordering::Relaxed)
            && args.consumers > 0
            && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sh.stop.store(true, Ordering::Relaxed);
    }
    let mut e2e = new_hist()?;
    for c in consumers {
        match tokio::time::timeout(Duration::from_secs(5), c).await {
            Ok(Ok(Ok(h))) => e2e.add(&h).map_err(|e| anyhow!("histogram: {e}"))?,
            Ok(Ok(Err(e))) => sh.error("consumer", e),
            Ok(Err(e)) => sh.error("consumer task", e),
            Err(_) => sh.error("consumer", "did not stop within 5 s"),
        }
    }
    let (window, server_cpu, steal, own_cpu) = sampler.await.map_err(|e| anyhow!("sampler: {e}"))?;

    let secs = if consume_mode { produce_elapsed.as_secs_f64() } else { window.as_secs_f64() };
    let acked = if consume_mode { sh.acked_total.load(Ordering::Relaxed) } else { sh.acked.load(Ordering::Relaxed) };
    let rate = acked as f64 / secs;
    let mb = rate * args.record_size as f64 / 1e6;
    let consumed =
        if consume_mode { sh.consumed_total.load(Ordering::Relaxed) } else { sh.consumed.load(Ordering::Relaxed) };
    let consume_rate = if consume_mode { consumed as f64 / consume_secs } else { consumed as f64 / secs };
    let cpu_per_m = if acked > 0 && !args.pids.is_empty() { server_cpu / acked as f64 * 1e6 } else { f64::NAN };
    let rss: Vec<serde_json::Value> = args
        .pids
        .iter()
        .map(|p| serde_json::json!({"pid": p, "vm_hwm_kb": status_kb(*p, "VmHWM").ok(), "vm_rss_kb": status_kb(*p, "VmRSS").ok()}))
        .collect();

    println!(
        "{:?} {:?} {:?}: {} producers, {} consumers, {} B records, {} partitions, {}",
        args.system,
        args.mode,
        args.api,
        args.producers,
        args.consumers,
        args.record_size,
        args.partitions,
        if args.mode == Mode::Rate {
            format!("offered {:.0} rec/s", args.rate)
        } else {
            format!("in flight {}", args.in_flight)
        }
    );
    println!("acked      {rate:>12.0} rec/s  {mb:>8.2} MB/s   ({acked} records in {secs:.2} s)");
    println!("consumed   {consume_rate:>12.0} rec/s  ({consumed} records)");
    println!("{}", human("produce->ack", &ack));
    println!("{}", human("end-to-end", &e2e));
    println!(
        "server cpu {server_cpu:.2} s ({:.1} s per 1M acked)  loadgen cpu {own_cpu:.2} s  steal {steal:.1}%  errors {}",
        cpu_per_m,
        sh.errors.load(Ordering::Relaxed)
    );
    let json = serde_json::json!({
        "busbar_load": 1,
        "label": args.label,
        "system": format!("{:?}", args.system).to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "api": format!("{:?}", args.api).to_lowercase(),
        "producers": args.producers,
        "consumers": args.consumers,
        "record_size": args.record_size,
        "keyed": args.keyed,
        "partitions": args.partitions,
        "linger_ms": args.linger_ms,
        "max_batch_bytes": args.max_batch_bytes,
        "in_flight": args.in_flight,
        "offered_rate": (args.mode == Mode::Rate).then_some(args.rate),
        "secs": secs,
        "acked": acked,
        "acked_total": sh.acked_total.load(Ordering::Relaxed),
        "acked_per_sec": rate,
        "acked_mb_per_sec": mb,
        "consumed": consumed,
        "consumed_per_sec": consume_rate,
        "produce_ack": quantiles(&ack),
        "end_to_end": quantiles(&e2e),
        "server_cpu_secs": server_cpu,
        "server_cpu_secs_per_million": cpu_per_m,
        "loadgen_cpu_secs": own_cpu,
        "steal_pct": steal,
        "errors": sh.errors.load(Ordering::Relaxed),
        "servers": rss,
    });
    println!("{json}");
    Ok(())
}
