//! The one place internal errors become gRPC statuses. Every error a client sees carries the
//! numbered code (`busbar-error-code` metadata) from `busbar_types::ErrorCode`, a message, and for
//! NOT_LEADER the leader's address (`busbar-leader-addr`).

use busbar_proto::{ERROR_CODE_KEY, LEADER_ADDR_KEY};
use busbar_raft::types::{ClientWriteError, RaftError};
use busbar_raft::BasicNode;
use busbar_storage::StoreError;
use busbar_types::{ApiError, ErrorCode, NodeId};
use openraft::error::{ChangeMembershipError, ForwardToLeader};
use tonic::{Code, Status};

pub fn status(err: ApiError) -> Status {
    let code = match err.code {
        ErrorCode::None => Code::Ok,
        ErrorCode::OffsetOutOfRange => Code::OutOfRange,
        ErrorCode::UnknownTopicOrPartition => Code::NotFound,
        ErrorCode::TopicAlreadyExists => Code::AlreadyExists,
        ErrorCode::NotLeader | ErrorCode::LeaderNotAvailable | ErrorCode::ShuttingDown => Code::Unavailable,
        ErrorCode::RequestTimedOut | ErrorCode::Indeterminate => Code::DeadlineExceeded,
        ErrorCode::RecordTooLarge
        | ErrorCode::RecordListTooLarge
        | ErrorCode::InvalidTopic
        | ErrorCode::InvalidPartitions
        | ErrorCode::InvalidRequest => Code::InvalidArgument,
        ErrorCode::MembershipChangeFailed
        | ErrorCode::OutOfOrderSequenceNumber
        | ErrorCode::DuplicateSequenceNumber
        | ErrorCode::UnknownProducerId
        | ErrorCode::IllegalGeneration
        | ErrorCode::UnknownMemberId
        | ErrorCode::NonEmptyGroup => Code::FailedPrecondition,
        ErrorCode::InvalidGroupId | ErrorCode::InvalidSessionTimeout | ErrorCode::InvalidConfig => {
            Code::InvalidArgument
        }
        ErrorCode::GroupIdNotFound => Code::NotFound,
        ErrorCode::CorruptMessage | ErrorCode::KafkaStorageError | ErrorCode::UnknownServerError => Code::Internal,
    };
    let mut st = Status::new(code, err.message);
    if let Ok(v) = err.code.number().to_string().parse() {
        st.metadata_mut().insert(ERROR_CODE_KEY, v);
    }
    if let Some(addr) = err.leader_addr.and_then(|a| a.parse().ok()) {
        st.metadata_mut().insert(LEADER_ADDR_KEY, addr);
    }
    st
}

pub fn api(code: ErrorCode, message: impl Into<String>) -> Status {
    status(ApiError::new(code, message))
}

pub fn from_store(e: StoreError) -> ApiError {
    match e {
        StoreError::UnknownTopicOrPartition { .. } => ApiError::new(ErrorCode::UnknownTopicOrPartition, e.to_string()),
        StoreError::OffsetOutOfRange { .. } => ApiError::new(ErrorCode::OffsetOutOfRange, e.to_string()),
        StoreError::Corrupt { .. } | StoreError::CorruptSnapshot { .. } => {
            tracing::error!(error = %e, "corrupt data detected; refusing to serve it");
            ApiError::new(ErrorCode::CorruptMessage, e.to_string())
        }
        StoreError::Sled(_) | StoreError::Io { .. } | StoreError::SnapshotUnavailable(_) => {
            tracing::error!(error = %e, "storage error");
            ApiError::new(ErrorCode::KafkaStorageError, e.to_string())
        }
    }
}

pub fn not_leader(fwd: &ForwardToLeader<NodeId, BasicNode>) -> ApiError {
    match (&fwd.leader_id, &fwd.leader_node) {
        (Some(id), Some(node)) => ApiError {
            code: ErrorCode::NotLeader,
            message: format!("this node is not the leader; node {id} at {} is", node.addr),
            leader_addr: Some(node.addr.clone()),
        },
        _ => ApiError::new(ErrorCode::LeaderNotAvailable, "no leader is known right now; retry shortly"),
    }
}

/// A failed write. Whether it may have committed matters: only errors raised before the entry was
/// proposed are definite failures.
pub fn from_write(e: RaftError<ClientWriteError>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(fwd)) => not_leader(&fwd),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => membership(e),
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped");
            ApiError::new(
                ErrorCode::Indeterminate,
                format!("the node's raft stopped while writing ({f}); the write may have committed"),
            )
        }
    }
}

fn membership(e: ChangeMembershipError<NodeId>) -> ApiError {
    ApiError::new(ErrorCode::MembershipChangeFailed, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_error_codes_match_the_domain_table() {
        use busbar_proto::v1::ErrorCode as Wire;
        for c in ErrorCode::ALL {
            let wire = Wire::try_from(c.number()).unwrap_or_else(|_| panic!("{c:?} missing from the proto enum"));
            let wire_name = wire.as_str_name().replace('_', "").to_ascii_lowercase();
            assert_eq!(wire_name, format!("{c:?}").to_ascii_lowercase(), "names differ for number {}", c.number());
        }
        // And the proto has nothing the domain table lacks.
        for n in -1..=1100 {
            if Wire::try_from(n).is_ok() {
                assert!(ErrorCode::from_number(n).is_some(), "proto code {n} missing from ErrorCode");
            }
        }
    }

    #[test]
    fn status_carries_code_and_leader() {
        let st = status(ApiError {
            code: ErrorCode::NotLeader,
            message: "m".into(),
            leader_addr: Some("10.0.0.1:9501".into()),
        });
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(st.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()), Some("6"));
        assert_eq!(st.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()), Some("10.0.0.1:9501"));
    }
}
