//! Commands: the application entries of the replicated log, and what applying one answers.
//!
//! Applying a command must be deterministic: every replica applies the same commands in the same log
//! order and must end in the same state. So a command carries everything that could differ between
//! nodes (the broker timestamp, for one) and validation that depends on state happens at apply time,
//! producing [`CommandResponse::Rejected`] identically everywhere.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::record_batch::RecordBatch;
use crate::topic::TopicName;
use crate::topic_config::TopicConfig;

/// A consumer group's name. Same rule as topic names (1 to 249 of `[a-zA-Z0-9._-]`): group names
/// show up in paths, metrics labels and CLI arguments, where the same safety helps.
pub type GroupName = TopicName;

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
        config: TopicConfig,
    },
    DeleteTopic {
        name: TopicName,
    },
    /// Append one batch to one partition. All records get consecutive offsets, or none is written.
    /// With `producer`, a batch the state machine has seen before gets its original offsets back
    /// instead of being written again. The records travel encoded, as they are stored
    /// ([`RecordBatch`]): no hop between the leader's API and the state machine decodes them.
    Produce {
        topic: TopicName,
        partition: u32,
        records: RecordBatch,
        producer: Option<ProducerSeq>,
    },
    /// Hand out a new producer id (unique in the cluster, never reused).
    InitProducerId,
    /// Replace a topic's configuration (keys not set take the cluster defaults).
    AlterTopicConfig {
        name: TopicName,
        config: TopicConfig,
    },
    /// Retention, decided by the leader: the partition's records below `new_start` (a batch
    /// boundary) are dropped. `topic_id` guards against a topic deleted and recreated meanwhile.
    TruncatePrefix {
        topic: TopicName,
        topic_id: u32,
        partition: u32,
        new_start: u64,
    },
    /// A member joins (or rejoins, with new subscriptions) a consumer group; the group rebalances.
    /// `member_id` is chosen by the coordinator before proposing, so every replica agrees on it.
    JoinGroup {
        group: GroupName,
        member_id: String,
        topics: Vec<TopicName>,
        session_timeout_ms: u32,
    },
    /// A member leaves, explicitly or because its session expired; the group rebalances.
    LeaveGroup {
        group: GroupName,
        member_id: String,
    },
    /// Every revocation of `generation` was acknowledged: hand the released partitions over.
    CompleteRebalance {
        group: GroupName,
        generation: u64,
    },
    /// A member commits offsets (the next offset to consume) of partitions it owns in `generation`.
    CommitOffsets {
        group: GroupName,
        member_id: String,
        generation: u64,
        offsets: Vec<(TopicName, u32, u64)>,
    },
    /// An admin moves an inactive group's offsets of one topic.
    ResetOffsets {
        group: GroupName,
        topic: TopicName,
        to: OffsetReset,
    },
    /// An admin deletes an inactive group and its offsets.
    DeleteGroup {
        group: GroupName,
    },
    /// Several commands in one log entry, applied in order as if each had its own entry; the
    /// answer is [`CommandResponse::Batch`], one response per command. The server's proposer
    /// packs the writes that arrive while earlier entries are being committed into one entry,
    /// because the Raft core makes each entry durable before it takes the next. A command
    /// inside a batch may not itself be a batch (rejected as INVALID_REQUEST).
    Batch(Vec<Command>),
    /// From this entry on, apply with the rules of `version` (see `busbar_storage::apply_version`).
    /// The leader proposes it once every member reports a binary that knows `version`, so that
    /// nodes running different builds never apply one entry differently. Last in this enum: the
    /// encoding of every earlier command is unchanged.
    SetApplyVersion {
        version: u32,
    },
}

/// Where [`Command::ResetOffsets`] moves a group's offsets: resolved at apply time, from the
/// partitions' offsets at that point of the log, so every replica resolves it alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetReset {
    Earliest,
    Latest,
    Offset(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// The entry was not an application command (blank or membership entry).
    Empty,
    TopicCreated {
        topic_id: u32,
    },
    TopicDeleted,
    TopicConfigChanged,
    /// Retention moved the partition's start offset (or it was already past `new_start`).
    PrefixTruncated {
        start_offset: u64,
    },
    /// `duplicate`: the batch had been written before; these are its original offsets.
    Produced {
        base_offset: u64,
        count: u32,
        duplicate: bool,
    },
    ProducerIdAssigned {
        producer_id: u64,
    },
    /// A group changed (membership, assignment or offsets); `generation` is its generation after.
    GroupChanged {
        generation: u64,
    },
    /// The state machine refused the command; nothing was changed.
    Rejected {
        code: ErrorCode,
        message: String,
    },
    /// The answers to a [`Command::Batch`], in its order.
    Batch(Vec<CommandResponse>),
    /// The apply version in effect after a [`Command::SetApplyVersion`].
    ApplyVersionSet {
        version: u32,
    },
}
