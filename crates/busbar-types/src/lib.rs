//! Busbar's domain types, shared by every layer: what a record is, what a topic is, the commands that
//! travel through the replicated log, and the stable numbered error codes clients see.
//!
//! This crate does no IO and knows nothing of Raft, sled or gRPC.

pub mod command;
pub mod error;
pub mod record;
pub mod record_batch;
pub mod topic;
pub mod topic_config;

pub use command::{Command, CommandResponse, GroupName, OffsetReset, ProducerSeq};
pub use error::{ApiError, ErrorCode};
pub use record::{Header, Record};
pub use record_batch::{RecordBatch, RecordBatchError, RecordEncoding};
pub use topic::{TopicName, TopicNameError};
pub use topic_config::{ConfigError, TopicConfig};

/// A cluster node's identity: unique in a cluster, never reused for a different node.
pub type NodeId = u64;
