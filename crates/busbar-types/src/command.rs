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
    Produce {
        topic: TopicName,
        partition: u32,
        records: Vec<Record>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// The entry was not an application command (blank or membership entry).
    Empty,
    TopicCreated {
        topic_id: u32,
    },
    TopicDeleted,
    Produced {
        base_offset: u64,
        count: u32,
    },
    /// The state machine refused the command; nothing was changed.
    Rejected {
        code: ErrorCode,
        message: String,
    },
}
