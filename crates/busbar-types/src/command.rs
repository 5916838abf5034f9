//! Commands: the application entries of the replicated log, and what applying one answers.
//!
//! Applying a command must be deterministic: every replica applies the same commands in the same log
//! order and must end in the same state. So a command carries everything that could differ between
//! nodes (the broker timestamp, for one) and validation that depends on state happens at apply time,
//! producing [`CommandResponse::Rejected`] identically everywhere.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::record::Record;
use crate::topic::TopicName;

/// An idempotent producer's identity on one batch: its id, and the batch's sequence number in the
/// partition (0, 1, 2, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSeq {
    pub producer_id: u64,
    pub sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateTopic {
        name: TopicName,
        partitions: u32,
    },
    DeleteTopic {
        name: TopicName,
    },
    /// Append one batch to one partition. All records get consecutive offsets, or none is written.
    /// With `producer`, a batch the state machine has seen before gets its original offsets back
    /// instead of being written again.
    Produce {
        topic: TopicName,
        partition: u32,
        records: Vec<Record>,
        producer: Option<ProducerSeq>,
    },
    /// Hand out a new producer id (unique in the cluster, never reused).
    InitProducerId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// The entry was not an application command (blank or membership entry).
    Empty,
    TopicCreated {
        topic_id: u32,
    },
    TopicDeleted,
    /// `duplicate`: the batch had been written before; these are its original offsets.
    Produced {
        base_offset: u64,
        count: u32,
        duplicate: bool,
    },
    ProducerIdAssigned {
        producer_id: u64,
    },
    /// The state machine refused the command; nothing was changed.
    Rejected {
        code: ErrorCode,
        message: String,
    },
}
