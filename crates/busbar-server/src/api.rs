//! The public client API (`busbar.v1.Busbar`): topics, produce, fetch, offsets.
//!
//! Writes go through Raft on the leader; a follower answers NOT_LEADER with the leader's address.
//! Reads are served by any node from its applied state, which only ever holds committed entries.

use std::time::{SystemTime, UNIX_EPOCH};

use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_server::Busbar;
use busbar_raft::RaftNode;
use busbar_types::{Command, CommandResponse, ErrorCode, Header, Record, TopicName};
use bytes::Bytes;
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::error::{self, api};

pub struct BusbarService {
    node: RaftNode,
    limits: Limits,
}

impl BusbarService {
    pub fn new(node: RaftNode, limits: Limits) -> Self {
        Self { node, limits }
    }

    /// Proposes a command and waits for it to be committed and applied, within the write timeout.
    async fn write(&self, cmd: Command) -> Result<CommandResponse, Status> {
        let res = tokio::time::timeout(self.limits.write_timeout, self.node.raft.client_write(cmd)).await;
        match res {
            Err(_) => Err(api(
                ErrorCode::Indeterminate,
                format!(
                    "no commit within {:?}: the write may or may not have been committed (leader change or lost quorum)",
                    self.limits.write_timeout
                ),
            )),
            Ok(Err(e)) => Err(error::status(error::from_write(e))),
            Ok(Ok(resp)) => match resp.data {
                CommandResponse::Rejected { code, message } => Err(api(code, message)),
                other => Ok(other),
            },
        }
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
fn records_from_wire(records: Vec<pb::Record>, limits: &Limits) -> Result<Vec<Record>, Status> {
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
        let rec = Record {
            key: r.key.map(Bytes::from),
            value: Bytes::from(r.value),
            headers: r.headers.into_iter().map(|h| Header { name: h.name, value: Bytes::from(h.value) }).collect(),
            timestamp_ms: if r.timestamp_ms == 0 { now } else { r.timestamp_ms },
        };
        let size = rec.encoded_len_hint();
        if size > limits.max_record_bytes {
            return Err(api(
                ErrorCode::RecordTooLarge,
                format!(
                    "record {i} is {size} bytes; the limit is {} bytes (max_record_bytes)",
                    limits.max_record_bytes
                ),
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
            key: r.key.map(|k| k.to_vec()),
            value: r.value.to_vec(),
            headers: r.headers.into_iter().map(|h| pb::Header { name: h.name, value: h.value.to_vec() }).collect(),
            timestamp_ms: r.timestamp_ms,
        }),
    }
}

fn unexpected(resp: CommandResponse) -> Status {
    api(ErrorCode::UnknownServerError, format!("unexpected response from the state machine: {resp:?}"))
}

#[tonic::async_trait]
impl Busbar for BusbarService {
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = req.into_inner();
        let name = topic_name(&req.name)?;
        if req.partitions == 0 || req.partitions > self.limits.max_partitions {
            return Err(api(
                ErrorCode::InvalidPartitions,
                format!("partitions must be 1..={}; got {}", self.limits.max_partitions, req.partitions),
            ));
        }
        match self.write(Command::CreateTopic { name: name.clone(), partitions: req.partitions }).await? {
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
        match self.write(Command::DeleteTopic { name }).await? {
            CommandResponse::TopicDeleted => Ok(Response::new(pb::DeleteTopicResponse {})),
            other => Err(unexpected(other)),
        }
    }

    async fn list_topics(
        &self,
        _req: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self.node.store.list_topics().map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: topics
                .into_iter()
                .map(|t| pb::TopicInfo { name: t.name.to_string(), partitions: t.partitions })
                .collect(),
        }))
    }

    async fn produce(&self, req: Request<pb::ProduceRequest>) -> Result<Response<pb::ProduceResponse>, Status> {
        let req = req.into_inner();
        let topic = topic_name(&req.topic)?;
        let records = records_from_wire(req.records, &self.limits)?;
        let partition = req.partition;
        match self.write(Command::Produce { topic, partition, records }).await? {
            CommandResponse::Produced { base_offset, count } => {
                Ok(Response::new(pb::ProduceResponse { partition, base_offset, count }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn fetch(&self, req: Request<pb::FetchRequest>) -> Result<Response<pb::FetchResponse>, Status> {
        let req = req.into_inner();
        topic_name(&req.topic)?;
        let max_records = match req.max_records {
            0 => 1000,
            n => n.min(self.limits.max_fetch_records),
        } as usize;
        let max_bytes = match req.max_bytes {
            0 => 1 << 20,
            n => n.min(self.limits.max_fetch_bytes),
        } as usize;
        let store = self.node.store.clone();
        let res = tokio::task::spawn_blocking(move || {
            store.read(&req.topic, req.partition, req.offset, max_records, max_bytes)
        })
        .await
        .map_err(|e| api(ErrorCode::UnknownServerError, format!("fetch task failed: {e}")))?;
        let r = res.map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::FetchResponse {
            records: r.records.into_iter().map(|(o, rec)| record_to_wire(o, rec)).collect(),
            start_offset: r.start_offset,
            end_offset: r.end_offset,
        }))
    }

    async fn list_offsets(
        &self,
        req: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let req = req.into_inner();
        topic_name(&req.topic)?;
        let offsets = self.node.store.partition_offsets(&req.topic).map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::ListOffsetsResponse {
            partitions: offsets
                .into_iter()
                .map(|p| pb::PartitionOffsets {
                    partition: p.partition,
                    start_offset: p.start_offset,
                    end_offset: p.end_offset,
                })
                .collect(),
        }))
    }
}
