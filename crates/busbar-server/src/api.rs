//! The public client API (`busbar.v1.Busbar`): topics, produce (unary and streamed), fetch with long
//! poll, subscribe, offsets, cluster metadata.
//!
//! Writes go through Raft on the leader; a follower answers NOT_LEADER with the leader's address.
//! Reads are served by any node from its applied state, which only ever holds committed entries.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_server::Busbar;
use busbar_raft::RaftNode;
use busbar_storage::apply_version::record_encoding;
use busbar_storage::{FetchResult, TopicInfo};
use busbar_types::{
    Command, CommandResponse, ErrorCode, Header, ProducerSeq, Record, RecordBatch, TopicConfig, TopicName,
};
use futures::Stream;
use openraft::ServerState;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Limits;
use crate::error::{self, api};
use crate::propose::Proposer;
use crate::read_index;

/// Batches of one produce stream that may await their commit at once, and their bytes (a batch
/// larger than the byte budget goes alone). A client sending one record per message needs hundreds
/// in flight to fill the proposer's entries: at 64, one such stream reached ~40k records/s on the
/// benchmark machine and the nodes idled; at 256 it reached ~77k (docs/benchmarks.md).
const STREAM_IN_FLIGHT: usize = 1024;
const STREAM_IN_FLIGHT_BYTES: usize = 32 << 20;
/// Longest long poll a fetch may ask for.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Messages a subscription may have queued for a slow reader before it waits.
const SUBSCRIBE_QUEUE: usize = 4;
/// A read that starts within this many records of the partition's end is served on the calling
/// task: its bytes were written moments ago (page cache, sled's cache, or the store's uncommitted
/// references in memory), so it does not wait on the disk. Handing each such read to the blocking
/// pool cost a thread wake-up per read, and a tailing consumer reads once per partition per log
/// entry: 5-10% of the servers' CPU at one record per request. Older data may need the disk and
/// goes to the blocking pool.
const INLINE_READ_TAIL: u64 = 4096;
/// Most bytes an inline read returns.
const INLINE_READ_BYTES: usize = 256 << 10;

#[derive(Clone)]
pub struct BusbarService {
    inner: Arc<Inner>,
}

struct Inner {
    node: RaftNode,
    proposer: Proposer,
    limits: Limits,
    /// Spreads keyless batches that name no partition over the partitions.
    next_keyless: AtomicU32,
    topic_defaults: TopicConfig,
    /// Turns true when the node stops: long polls answer and subscriptions end, so a graceful stop
    /// (which waits for open requests) is not held up by a reader waiting for data.
    stop: tokio::sync::watch::Receiver<bool>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl BusbarService {
    pub fn new(
        node: RaftNode,
        proposer: Proposer,
        limits: Limits,
        topic_defaults: TopicConfig,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner { node, proposer, limits, next_keyless: AtomicU32::new(0), topic_defaults, stop }),
        }
    }
}

impl Inner {
    async fn write(&self, cmd: Command) -> Result<CommandResponse, Status> {
        self.proposer.write(cmd).await
    }

    /// Checks a produce request and turns it into a command.
    fn produce_command(&self, req: pb::ProduceRequest) -> Result<(u32, Command), Status> {
        let topic = topic_name(&req.topic)?;
        // One look at the store for everything below, not one each.
        let (info, version) =
            self.node.store.topic_and_apply_version(topic.as_str()).map_err(|e| error::status(error::from_store(e)))?;
        let records = records_from_wire(req.records, &self.limits, self.record_limit(info.as_ref()))?;
        let partition = match req.partition {
            Some(p) => p,
            None => self.choose_partition(&topic, info.as_ref(), &records)?,
        };
        let producer =
            (req.producer_id != 0).then_some(ProducerSeq { producer_id: req.producer_id, sequence: req.sequence });
        // Encoded once, here: every later hop (log, replication, apply) copies these bytes. In
        // the encoding every member reads, by the version this node applies at.
        let records = RecordBatch::encode(&records, record_encoding(version))
            .map_err(|e| api(ErrorCode::InvalidRequest, format!("the batch cannot be encoded: {e}")))?;
        Ok((partition, Command::Produce { topic, partition, records, producer }))
    }

    /// The largest record a topic takes: the server's limit, or the topic's `max.message.bytes`
    /// (its own, else the cluster default) when that is smaller.
    fn record_limit(&self, topic: Option<&TopicInfo>) -> usize {
        let topic_max = topic.and_then(|t| t.config.or(&self.topic_defaults).max_message_bytes).map(|m| m as usize);
        topic_max.map_or(self.limits.max_record_bytes, |m| m.min(self.limits.max_record_bytes))
    }

    /// The partition of a batch that names none: its keys' partition (murmur2, as Kafka), which all
    /// keyed records must share; a batch without keys goes to the next partition in turn.
    fn choose_partition(&self, topic: &TopicName, info: Option<&TopicInfo>, records: &[Record]) -> Result<u32, Status> {
        let info = info.ok_or_else(|| api(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {topic}")))?;
        let mut chosen = None;
        for r in records {
            if let Some(k) = &r.key {
                let p = busbar_proto::partition::for_key(k, info.partitions);
                match chosen {
                    None => chosen = Some(p),
                    Some(c) if c != p => {
                        return Err(api(
                            ErrorCode::InvalidRequest,
                            format!(
                                "the batch's keys map to partitions {c} and {p}: a batch goes to one partition; \
                                 split it by key or name the partition"
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(chosen.unwrap_or_else(|| self.next_keyless.fetch_add(1, Ordering::Relaxed) % info.partitions.max(1)))
    }

    async fn read(
        &self,
        topic: String,
        partition: u32,
        offset: u64,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<FetchResult, Status> {
        let max_records = match max_records {
            0 => 1000,
            n => n.min(self.limits.max_fetch_records),
        } as usize;
        let max_bytes = match max_bytes {
            0 => 1 << 20,
            n => n.min(self.limits.max_fetch_bytes),
        } as usize;
        let store = self.node.store.clone();
        let near_end =
            store.end_offset(&topic, partition).is_ok_and(|end| offset.saturating_add(INLINE_READ_TAIL) >= end);
        // Short (a fetch may return fewer bytes than asked; the client asks again), so one inline
        // read stays a bounded memcpy. Never waits on this worker thread: while the store releases
        // files (compaction, reclaim), the read goes to a blocking thread like any other.
        let inline = near_end
            .then(|| store.try_read(&topic, partition, offset, max_records, max_bytes.min(INLINE_READ_BYTES)))
            .flatten();
        let res = match inline {
            Some(res) => res,
            None => tokio::task::spawn_blocking(move || store.read(&topic, partition, offset, max_records, max_bytes))
                .await
                .map_err(|e| api(ErrorCode::UnknownServerError, format!("read task failed: {e}")))?,
        };
        res.map_err(|e| error::status(error::from_store(e)))
    }
}

fn topic_name(name: &str) -> Result<TopicName, Status> {
    TopicName::new(name).map_err(|e| api(ErrorCode::InvalidTopic, e.to_string()))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Checks a produce batch against the limits and turns it into domain records. Timestamps the
/// producer left at 0 are set here, on the proposing node, so every replica stores the same value.
fn records_from_wire(
    records: Vec<pb::Record>,
    limits: &Limits,
    max_record_bytes: usize,
) -> Result<Vec<Record>, Status> {
    if records.is_empty() {
        return Err(api(ErrorCode::InvalidRequest, "a produce request needs at least one record"));
    }
    if records.len() > limits.max_batch_records {
        return Err(api(
            ErrorCode::RecordListTooLarge,
            format!(
                "{} records in one batch; the limit is {} (max_batch_records)",
                records.len(),
                limits.max_batch_records
            ),
        ));
    }
    let now = now_ms();
    let mut total = 0usize;
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        if r.timestamp_ms < 0 {
            return Err(api(
                ErrorCode::InvalidRequest,
                format!("record {i} has a negative timestamp {}", r.timestamp_ms),
            ));
        }
        let rec = Record {
            // Slices of the request's buffer, no copy: the batch is encoded from them right away
            // (`produce_command`), so nothing keeps that buffer alive past the request.
            key: r.key,
            value: r.value,
            headers: r.headers.into_iter().map(|h| Header { name: h.name, value: h.value }).collect(),
            timestamp_ms: if r.timestamp_ms == 0 { now } else { r.timestamp_ms },
        };
        let size = rec.encoded_len_hint();
        if size > max_record_bytes {
            return Err(api(
                ErrorCode::RecordTooLarge,
                format!("record {i} is {size} bytes; the limit is {max_record_bytes} bytes (max.message.bytes / max_record_bytes)"),
            ));
        }
        total += size;
        out.push(rec);
    }
    if total > limits.max_batch_bytes {
        return Err(api(
            ErrorCode::RecordListTooLarge,
            format!("the batch is {total} bytes; the limit is {} bytes (max_batch_bytes)", limits.max_batch_bytes),
        ));
    }
    Ok(out)
}

fn record_to_wire(offset: u64, r: Record) -> pb::ConsumedRecord {
    pb::ConsumedRecord {
        offset,
        record: Some(pb::Record {
            key: r.key,
            value: r.value,
            headers: r.headers.into_iter().map(|h| pb::Header { name: h.name, value: h.value }).collect(),
            timestamp_ms: r.timestamp_ms,
        }),
    }
}

fn fetch_to_wire(r: FetchResult) -> pb::FetchResponse {
    pb::FetchResponse {
        records: r.records.into_iter().map(|(o, rec)| record_to_wire(o, rec)).collect(),
        start_offset: r.start_offset,
        end_offset: r.end_offset,
    }
}

fn offsets_to_wire(p: busbar_storage::PartitionOffsets) -> pb::PartitionOffsets {
    pb::PartitionOffsets {
        partition: p.partition,
        start_offset: p.start_offset,
        end_offset: p.end_offset,
        size_bytes: p.bytes,
    }
}

fn unexpected(resp: CommandResponse) -> Status {
    api(ErrorCode::UnknownServerError, format!("unexpected response from the state machine: {resp:?}"))
}

fn produced(partition: u32, resp: CommandResponse) -> Result<pb::ProduceResponse, Status> {
    match resp {
        CommandResponse::Produced { base_offset, count, duplicate } => {
            Ok(pb::ProduceResponse { partition, base_offset, count, duplicate })
        }
        other => Err(unexpected(other)),
    }
}

fn stream_error(st: &Status) -> pb::Error {
    let meta = |k: &str| st.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    pb::Error {
        code: meta(busbar_proto::ERROR_CODE_KEY)
            .and_then(|c| c.parse().ok())
            .unwrap_or(ErrorCode::UnknownServerError.number()),
        message: st.message().to_string(),
        leader_addr: meta(busbar_proto::LEADER_ADDR_KEY).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Busbar for BusbarService {
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = req.into_inner();
        let name = topic_name(&req.name)?;
        let max = self.inner.limits.max_partitions;
        if req.partitions == 0 || req.partitions > max {
            return Err(api(
                ErrorCode::InvalidPartitions,
                format!("partitions must be 1..={max}; got {}", req.partitions),
            ));
        }
        let config = TopicConfig::from_pairs(req.config.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| api(ErrorCode::InvalidConfig, e.to_string()))?;
        match self.inner.write(Command::CreateTopic { name: name.clone(), partitions: req.partitions, config }).await? {
            CommandResponse::TopicCreated { .. } => {
                Ok(Response::new(pb::CreateTopicResponse { name: name.to_string(), partitions: req.partitions }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let name = topic_name(&req.into_inner().name)?;
        match self.inner.write(Command::DeleteTopic { name }).await? {
            CommandResponse::TopicDeleted => Ok(Response::new(pb::DeleteTopicResponse {})),
            other => Err(unexpected(other)),
        }
    }

    async fn list_topics(
        &self,
        _req: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self.inner.node.store.list_topics().map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: topics
                .into_iter()
                .map(|t| pb::TopicInfo { name: t.name.to_string(), partitions: t.partitions })
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        req: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let name = topic_name(&req.into_inner().name)?;
        let store = &self.inner.node.store;
        let info = store
            .topic(name.as_str())
            .map_err(|e| error::status(error::from_store(e)))?
            .ok_or_else(|| api(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {name}")))?;
        let offsets = store.partition_offsets(name.as_str()).map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(pb::TopicInfo { name: info.name.to_string(), partitions: info.partitions }),
            partitions: offsets.into_iter().map(offsets_to_wire).collect(),
            config: info.config.or(&self.inner.topic_defaults).to_map().into_iter().collect(),
            topic_config: info.config.to_map().into_iter().collect(),
        }))
    }

    async fn alter_topic_config(
        &self,
        req: Request<pb::AlterTopicConfigRequest>,
    ) -> Result<Response<pb::AlterTopicConfigResponse>, Status> {
        let req = req.into_inner();
        let name = topic_name(&req.name)?;
        let info = self
            .inner
            .node
            .store
            .topic(name.as_str())
            .map_err(|e| error::status(error::from_store(e)))?
            .ok_or_else(|| api(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {name}")))?;
        let mut config = info.config;
        let invalid = |e: busbar_types::ConfigError| api(ErrorCode::InvalidConfig, e.to_string());
        for (k, v) in &req.set {
            config.set(k, Some(v)).map_err(invalid)?;
        }
        for k in &req.unset {
            config.set(k, None).map_err(invalid)?;
        }
        // Last writer wins: an alter replaces the whole config with what this node computed, like
        // Kafka's incremental alter applied on the controller.
        match self.inner.write(Command::AlterTopicConfig { name, config }).await? {
            CommandResponse::TopicConfigChanged => Ok(Response::new(pb::AlterTopicConfigResponse {
                config: config.or(&self.inner.topic_defaults).to_map().into_iter().collect(),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn produce(&self, req: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        let _timer = crate::metrics::requests().produce.timer();
        let (partition, cmd) = self.inner.produce_command(req.into_inner())?;
        let resp = self.inner.write(cmd).await?;
        Ok(Response::new(produced(partition, resp)?))
    }

    type ProduceStreamStream = BoxStream<pb::ProduceStreamResponse>;

    async fn produce_stream(
        &self,
        req: Request<Streaming<pb::ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
            let in_flight_bytes = Arc::new(Semaphore::new(STREAM_IN_FLIGHT_BYTES));
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(st) => {
                        tracing::debug!(status = %st, "produce stream ended by the client");
                        break;
                    }
                };
                // Bounded: a stream may have STREAM_IN_FLIGHT batches (STREAM_IN_FLIGHT_BYTES)
                // awaiting commit; the next one is read only when enough of them are answered.
                let cost = prost::Message::encoded_len(&msg).clamp(1, STREAM_IN_FLIGHT_BYTES) as u32;
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let Ok(bytes_permit) = in_flight_bytes.clone().acquire_many_owned(cost).await else { break };
                let request_id = msg.request_id;
                let prepared = msg
                    .batch
                    .ok_or_else(|| api(ErrorCode::InvalidRequest, "a produce stream message needs a batch"))
                    .and_then(|b| inner.produce_command(b));
                // Proposed here, in arrival order, so an idempotent producer's sequences reach the
                // log in order; the commits are awaited concurrently.
                let proposed = match prepared {
                    Ok((partition, cmd)) => inner.proposer.propose(cmd).await.map(|p| (partition, p)),
                    Err(st) => Err(st),
                };
                let inner = inner.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let result = match proposed {
                        Ok((partition, p)) => inner.proposer.outcome(p).await.and_then(|r| produced(partition, r)),
                        Err(st) => Err(st),
                    };
                    let result = match result {
                        Ok(ack) => pb::produce_stream_response::Result::Ack(ack),
                        Err(st) => pb::produce_stream_response::Result::Error(stream_error(&st)),
                    };
                    let _ = tx.send(Ok(pb::ProduceStreamResponse { request_id, result: Some(result) })).await;
                    drop((permit, bytes_permit));
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn init_producer_id(
        &self,
        _req: Request<pb::InitProducerIdRequest>,
    ) -> Result<Response<pb::InitProducerIdResponse>, Status> {
        match self.inner.write(Command::InitProducerId).await? {
            CommandResponse::ProducerIdAssigned { producer_id } => {
                Ok(Response::new(pb::InitProducerIdResponse { producer_id }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn fetch(&self, req: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let _timer = crate::metrics::requests().fetch.timer();
        let req = req.into_inner();
        topic_name(&req.topic)?;
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_FETCH_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.inner.node.applied.clone();
        let mut stop = self.inner.stop.clone();
        loop {
            // Marked seen before reading, so a commit between the read and the wait is not missed.
            applied.borrow_and_update();
            let r =
                self.inner.read(req.topic.clone(), req.partition, req.offset, req.max_records, req.max_bytes).await?;
            if !r.records.is_empty() || tokio::time::Instant::now() >= deadline || *stop.borrow() {
                return Ok(Response::new(fetch_to_wire(r)));
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, applied.changed()) => {
                    if !matches!(changed, Ok(Ok(()))) {
                        // Timed out, or the state machine is gone: answer with what there is.
                        return Ok(Response::new(fetch_to_wire(r)));
                    }
                }
                _ = stop.changed() => return Ok(Response::new(fetch_to_wire(r))),
            }
        }
    }

    type SubscribeStream = BoxStream<pb::FetchResponse>;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        topic_name(&req.topic)?;
        // Fail at once on a bad topic, partition or offset, not inside the stream.
        let first =
            self.inner.read(req.topic.clone(), req.partition, req.offset, req.max_records, req.max_bytes).await?;
        let (tx, rx) = mpsc::channel(SUBSCRIBE_QUEUE);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut applied = inner.node.applied.clone();
            let mut stop = inner.stop.clone();
            let mut offset = req.offset;
            let mut pending = Some(first);
            loop {
                applied.borrow_and_update();
                let r = match pending.take() {
                    Some(r) => Ok(r),
                    None => inner.read(req.topic.clone(), req.partition, offset, req.max_records, req.max_bytes).await,
                };
                match r {
                    Ok(r) if !r.records.is_empty() => {
                        offset = r.records.last().map(|(o, _)| o + 1).unwrap_or(offset);
                        if tx.send(Ok(fetch_to_wire(r))).await.is_err() {
                            return; // the subscriber went away
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(st) => {
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                }
                if *stop.borrow() {
                    let _ =
                        tx.send(Err(api(ErrorCode::ShuttingDown, "the node is stopping; resubscribe elsewhere"))).await;
                    return;
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    // Stopping (checked at the top of the loop), or the server is gone: end.
                    changed = stop.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_offsets(
        &self,
        req: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let req = req.into_inner();
        topic_name(&req.topic)?;
        // On the leader, after a quorum round: an end offset below a record whose produce was
        // acknowledged before this call would send `seek_to_end` back over it.
        read_index::confirm(&self.inner.node).await?;
        let offsets =
            self.inner.node.store.partition_offsets(&req.topic).map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::ListOffsetsResponse { partitions: offsets.into_iter().map(offsets_to_wire).collect() }))
    }

    async fn metadata(&self, _req: Request<pb::MetadataRequest>) -> Result<Response<pb::MetadataResponse>, Status> {
        let m = self.inner.node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, n)| pb::NodeInfo { id: *id, addr: n.addr.clone(), voter: voters.contains(id) })
            .collect();
        let leader_addr =
            m.current_leader.and_then(|l| membership.get_node(&l)).map(|n| n.addr.clone()).unwrap_or_default();
        // A node that believes it leads but is not in state Leader (stepping down) reports no leader.
        let has_leader =
            m.current_leader.is_some() && (m.current_leader != Some(m.id) || m.state == ServerState::Leader);
        Ok(Response::new(pb::MetadataResponse {
            nodes,
            has_leader,
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr,
        }))
    }
}
