//! Reading one partition: by polling (long poll on `Fetch`) or as a stream (`Subscribe`).
//!
//! Any node serves reads, and a node only ever holds committed records, so a consumer never sees
//! a record that could still be lost. A node that lags behind the leader simply shows fewer of them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use busbar_proto::v1 as pb;
use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{codes, ClientError};
use crate::leader::LeaderCache;

/// A record read from a partition.
///
/// Its key, value and header values are slices of the message they arrived in (no copy per
/// record): keeping one record alive keeps the buffer that message was read into (about the
/// consumer's `max_bytes`, 1 MiB by default) in memory. Copy out (`to_vec()`) what is kept long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// In the order they were produced; names may repeat.
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch: as the producer set it, or as the broker did.
    pub timestamp_ms: i64,
}

impl ConsumerRecord {
    pub(crate) fn from_wire(topic: &str, partition: u32, r: pb::ConsumedRecord) -> Self {
        let rec = r.record.unwrap_or_default();
        Self {
            topic: topic.to_string(),
            partition,
            offset: r.offset,
            key: rec.key,
            value: rec.value,
            headers: rec.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            timestamp_ms: rec.timestamp_ms,
        }
    }
}

/// Bounds on what one read asks for, and on how hard a stream tries to stay connected.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Records per poll or per pushed message (the broker caps it too).
    pub max_records: u32,
    /// Bytes per poll or per pushed message; 0: the broker's default.
    pub max_bytes: u32,
    /// Reconnections a [`RecordStream`] makes in a row without receiving anything before it gives
    /// up with the last error.
    pub stream_max_retries: u32,
    /// First pause before a reconnection; doubles up to one second.
    pub stream_backoff: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self { max_records: 1000, max_bytes: 0, stream_max_retries: 10, stream_backoff: Duration::from_millis(50) }
    }
}

/// Reads one partition from a position that it advances.
///
/// ```no_run
/// use std::time::Duration;
/// use busbar_client::{Client, PartitionConsumer};
/// use futures::StreamExt;
/// # async fn demo() -> Result<(), busbar_client::ClientError> {
/// let client = Client::connect(["127.0.0.1:9501"]).await?;
/// let mut consumer = PartitionConsumer::new(client);
/// consumer.assign("orders", 0).await?;
/// consumer.seek_to_beginning().await?;
/// for r in consumer.poll(Duration::from_secs(1)).await? {
///     println!("{}@{}: {:?}", r.partition, r.offset, r.value);
/// }
/// // Or tail the partition from where polling stopped.
/// let mut stream = consumer.stream();
/// while let Some(r) = stream.next().await {
///     let r = r?;
///     println!("{}: {:?}", r.offset, r.value);
/// }
/// # Ok(()) }
/// ```
pub struct PartitionConsumer {
    client: Client,
    config: ConsumerConfig,
    assigned: Option<(String, u32)>,
    position: u64,
}

impl PartitionConsumer {
    pub fn new(client: Client) -> Self {
        Self::with_config(client, ConsumerConfig::default())
    }

    pub fn with_config(client: Client, config: ConsumerConfig) -> Self {
        Self { client, config, assigned: None, position: 0 }
    }

    /// Reads `partition` of `topic` from now on, starting at its first offset. Fails with
    /// UNKNOWN_TOPIC_OR_PARTITION (3) if there is no such partition.
    pub async fn assign(&mut self, topic: &str, partition: u32) -> Result<(), ClientError> {
        // Asked of the leader: a follower may not yet know a topic created a moment ago.
        let d = describe_on_leader(&self.client, topic).await?;
        let partitions = d.topic.map_or(0, |t| t.partitions);
        if partition >= partitions {
            return Err(ClientError::Api {
                code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                message: format!("topic {topic} has partitions 0..{partitions}; {partition} does not exist"),
                leader_addr: None,
            });
        }
        self.position = d.partitions.iter().find(|p| p.partition == partition).map_or(0, |p| p.start_offset);
        self.assigned = Some((topic.to_string(), partition));
        Ok(())
    }

    /// The assigned topic and partition.
    pub fn assignment(&self) -> Option<(&str, u32)> {
        self.assigned.as_ref().map(|(t, p)| (t.as_str(), *p))
    }

    /// The offset the next poll reads from.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Reads from `offset` next. Not checked here: a poll outside the partition's range fails with
    /// OFFSET_OUT_OF_RANGE (1), whose message gives the valid range.
    pub fn seek(&mut self, offset: u64) {
        self.position = offset;
    }

    /// Moves to the partition's first offset (the oldest record retained); returns it.
    pub async fn seek_to_beginning(&mut self) -> Result<u64, ClientError> {
        let o = self.offsets().await?;
        self.position = o.start_offset;
        Ok(self.position)
    }

    /// Moves to the partition's end (the offset the next record will get); returns it.
    pub async fn seek_to_end(&mut self) -> Result<u64, ClientError> {
        let o = self.offsets().await?;
        self.position = o.end_offset;
        Ok(self.position)
    }

    /// Records from the position on, waiting up to `max_wait` for the first one if there is none
    /// yet (returning as soon as one commits). Advances the position past what it returns; an
    /// empty answer means nothing arrived in time.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumerRecord>, ClientError> {
        let (topic, partition) = self.assigned()?;
        let resp = self.client.fetch_wait(&topic, partition, self.position, self.config.max_records, max_wait).await?;
        let mut out = Vec::with_capacity(resp.records.len());
        for r in resp.records {
            // Offsets only move forward; anything before the position was already returned.
            if r.offset < self.position {
                continue;
            }
            self.position = r.offset + 1;
            out.push(ConsumerRecord::from_wire(&topic, partition, r));
        }
        Ok(out)
    }

    /// Tails the partition from the current position as records commit (`Subscribe`). The
    /// consumer's own position does not move. When the connection breaks, the stream reconnects to
    /// the next broker from the offset after the last record it yielded, up to
    /// `stream_max_retries` times in a row; then it yields the error and ends. A definite error
    /// (unknown topic, offset out of range) is yielded at once and ends the stream.
    pub fn stream(&self) -> RecordStream {
        let start = match self.assigned() {
            Ok((topic, partition)) => Tail {
                client: self.client.clone(),
                config: self.config.clone(),
                topic,
                partition,
                offset: self.position,
                broker: 0,
                inner: None,
                buffered: VecDeque::new(),
                failures: 0,
                backoff: self.config.stream_backoff,
                connected_since: None,
                delivered_any: false,
                error: None,
                done: false,
            },
            Err(e) => Tail::failed(self.client.clone(), e),
        };
        RecordStream { inner: Box::pin(futures::stream::unfold(start, Tail::next)) }
    }

    fn assigned(&self) -> Result<(String, u32), ClientError> {
        self.assigned
            .clone()
            .ok_or_else(|| ClientError::InvalidArgument("no partition assigned; call assign first".into()))
    }

    async fn offsets(&self) -> Result<pb::PartitionOffsets, ClientError> {
        let (topic, partition) = self.assigned()?;
        self.client.list_offsets(&topic).await?.into_iter().find(|p| p.partition == partition).ok_or_else(|| {
            ClientError::Api {
                code: codes::UNKNOWN_TOPIC_OR_PARTITION,
                message: format!("topic {topic} has no partition {partition}"),
                leader_addr: None,
            }
        })
    }
}

async fn describe_on_leader(client: &Client, topic: &str) -> Result<pb::DescribeTopicResponse, ClientError> {
    let leader = LeaderCache::new(client.clone());
    if let Ok((_, ch)) = leader.channel().await {
        match client.api(ch).describe_topic(pb::DescribeTopicRequest { name: topic.to_string() }).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(st) => {
                let e = ClientError::from_status(&st);
                if !e.is_retriable() {
                    return Err(e);
                }
            }
        }
    }
    client.describe_topic(topic).await
}

/// The records of one partition as they commit; see [`PartitionConsumer::stream`].
pub struct RecordStream {
    inner: Pin<Box<dyn Stream<Item = Result<ConsumerRecord, ClientError>> + Send>>,
}

impl Stream for RecordStream {
    type Item = Result<ConsumerRecord, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A stream this long without trouble counts as healthy again: its earlier failures are forgotten.
const STREAM_HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// The state of a [`RecordStream`] between items.
struct Tail {
    client: Client,
    config: ConsumerConfig,
    topic: String,
    partition: u32,
    /// The next offset to yield.
    offset: u64,
    /// Index into the client's brokers of the one to subscribe to.
    broker: usize,
    inner: Option<tonic::Streaming<pb::FetchResponse>>,
    buffered: VecDeque<ConsumerRecord>,
    failures: u32,
    backoff: Duration,
    connected_since: Option<Instant>,
    delivered_any: bool,
    /// Yield this and end.
    error: Option<ClientError>,
    done: bool,
}

impl Tail {
    fn failed(client: Client, e: ClientError) -> Self {
        Self {
            client,
            config: ConsumerConfig::default(),
            topic: String::new(),
            partition: 0,
            offset: 0,
            broker: 0,
            inner: None,
            buffered: VecDeque::new(),
            failures: 0,
            backoff: Duration::ZERO,
            connected_since: None,
            delivered_any: false,
            error: Some(e),
            done: false,
        }
    }

    async fn next(mut self) -> Option<(Result<ConsumerRecord, ClientError>, Self)> {
        loop {
            if let Some(r) = self.buffered.pop_front() {
                return Some((Ok(r), self));
            }
            if let Some(e) = self.error.take() {
                // The last item: the stream ends after it.
                self.done = true;
                self.inner = None;
                return Some((Err(e), self));
            }
            if self.done {
                return None;
            }
            let step = match self.inner.as_mut() {
                None => match self.open().await {
                    Ok(s) => {
                        self.inner = Some(s);
                        self.connected_since = Some(Instant::now());
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some(s) => match s.message().await {
                    Ok(Some(resp)) => Ok(Some(resp)),
                    // The node ended the subscription (it is stopping).
                    Ok(None) => Err(ClientError::NoBroker {
                        brokers: vec![self.broker_addr()],
                        last: "the broker ended the subscription".into(),
                    }),
                    Err(st) => Err(ClientError::from_status(&st)),
                },
            };
            match step {
                Ok(Some(resp)) => {
                    self.failures = 0;
                    self.backoff = self.config.stream_backoff;
                    for r in resp.records {
                        // After a reconnection the new node starts at our offset; never yield a
                        // record twice or out of order.
                        if r.offset < self.offset {
                            continue;
                        }
                        self.offset = r.offset + 1;
                        self.delivered_any = true;
                        self.buffered.push_back(ConsumerRecord::from_wire(&self.topic, self.partition, r));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(fatal) = self.on_failure(e).await {
                        self.error = Some(fatal);
                    }
                }
            }
        }
    }

    fn broker_addr(&self) -> String {
        let b = self.client.brokers();
        b.get(self.broker % b.len().max(1)).cloned().unwrap_or_default()
    }

    async fn open(&self) -> Result<tonic::Streaming<pb::FetchResponse>, ClientError> {
        let addr = self.broker_addr();
        let ch = self
            .client
            .channel_to(&addr)
            .await
            .map_err(|e| ClientError::NoBroker { brokers: vec![addr.clone()], last: e })?;
        let req = pb::SubscribeRequest {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            max_records: self.config.max_records,
            max_bytes: self.config.max_bytes,
        };
        self.client.api(ch).subscribe(req).await.map(|r| r.into_inner()).map_err(|st| ClientError::from_status(&st))
    }

    /// Decides whether to reconnect after `e`; returns the error to end the stream with, if not.
    async fn on_failure(&mut self, e: ClientError) -> Option<ClientError> {
        self.inner = None;
        if self.connected_since.take().is_some_and(|t| t.elapsed() >= STREAM_HEALTHY_AFTER) {
            self.failures = 0;
            self.backoff = self.config.stream_backoff;
        }
        // Past the end on a node that lags behind the one we read from before: another node (or
        // this one a moment later) has the records. Before the first record it is the caller's
        // offset that is wrong.
        let lagging = e.code() == Some(codes::OFFSET_OUT_OF_RANGE) && self.delivered_any;
        if !(e.is_retriable() || lagging) {
            return Some(e);
        }
        self.failures += 1;
        if self.failures > self.config.stream_max_retries {
            tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "subscription gave up");
            return Some(e);
        }
        tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "subscription broke; reconnecting");
        self.broker = (self.broker + 1) % self.client.brokers().len().max(1);
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        None
    }
}
