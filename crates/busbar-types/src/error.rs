//! The one numbered table of error codes clients see. Append-only: never renumber, never reuse a
//! retired number. Kafka's numbers where the meaning matches (so Kafka-literate operators and tools
//! read them right); Busbar-only codes start at 1000. `proto/busbar/v1/busbar.proto` mirrors this
//! table for other languages and a test keeps the two equal.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(i32)]
pub enum ErrorCode {
    None = 0,
    UnknownServerError = -1,
    OffsetOutOfRange = 1,
    CorruptMessage = 2,
    UnknownTopicOrPartition = 3,
    LeaderNotAvailable = 5,
    NotLeader = 6,
    RequestTimedOut = 7,
    RecordTooLarge = 10,
    InvalidTopic = 17,
    RecordListTooLarge = 18,
    /// A group member's request names a generation that is not the group's current one.
    IllegalGeneration = 22,
    InvalidGroupId = 24,
    /// The member is not (or no longer) in the group: it must join again.
    UnknownMemberId = 25,
    InvalidSessionTimeout = 26,
    TopicAlreadyExists = 36,
    /// A topic configuration key is unknown or its value invalid.
    InvalidConfig = 40,
    InvalidPartitions = 37,
    InvalidRequest = 42,
    /// An idempotent producer's batch skipped a sequence number (a batch before it was lost).
    OutOfOrderSequenceNumber = 45,
    /// An idempotent producer's batch is older than the window of batches remembered for it.
    DuplicateSequenceNumber = 46,
    KafkaStorageError = 56,
    /// The producer id was never handed out by this cluster.
    UnknownProducerId = 59,
    /// The group has members; the operation needs an inactive group.
    NonEmptyGroup = 68,
    GroupIdNotFound = 69,
    /// The write may or may not have been committed (for example a timeout across a leader change).
    /// Retrying an idempotent write is safe; a non-idempotent one must be checked first.
    Indeterminate = 1000,
    /// A membership change (add or remove a node) could not be carried out.
    MembershipChangeFailed = 1001,
    /// The node is shutting down and takes no new requests.
    ShuttingDown = 1002,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::None,
        ErrorCode::UnknownServerError,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::CorruptMessage,
        ErrorCode::UnknownTopicOrPartition,
        ErrorCode::LeaderNotAvailable,
        ErrorCode::NotLeader,
        ErrorCode::RequestTimedOut,
        ErrorCode::RecordTooLarge,
        ErrorCode::InvalidTopic,
        ErrorCode::RecordListTooLarge,
        ErrorCode::IllegalGeneration,
        ErrorCode::InvalidGroupId,
        ErrorCode::UnknownMemberId,
        ErrorCode::InvalidSessionTimeout,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidPartitions,
        ErrorCode::InvalidRequest,
        ErrorCode::OutOfOrderSequenceNumber,
        ErrorCode::DuplicateSequenceNumber,
        ErrorCode::KafkaStorageError,
        ErrorCode::UnknownProducerId,
        ErrorCode::NonEmptyGroup,
        ErrorCode::GroupIdNotFound,
        ErrorCode::Indeterminate,
        ErrorCode::MembershipChangeFailed,
        ErrorCode::ShuttingDown,
    ];

    pub fn number(self) -> i32 {
        self as i32
    }

    pub fn from_number(n: i32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.number() == n)
    }

    /// Whether a client may retry the same request unchanged (after finding the leader again).
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::LeaderNotAvailable
                | ErrorCode::NotLeader
                | ErrorCode::RequestTimedOut
                | ErrorCode::Indeterminate
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({})", self, self.number())
    }
}

/// An error meant for a client: a stable code, a message for humans, and for NOT_LEADER the
/// leader's address when it is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub leader_addr: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), leader_addr: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.number()), "duplicate number {}", c.number());
            assert_eq!(ErrorCode::from_number(c.number()), Some(*c));
        }
        assert_eq!(ErrorCode::NotLeader.number(), 6);
        assert_eq!(ErrorCode::OffsetOutOfRange.number(), 1);
        assert_eq!(ErrorCode::UnknownTopicOrPartition.number(), 3);
    }
}
