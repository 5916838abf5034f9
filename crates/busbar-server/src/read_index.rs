//! Linearizable reads of the applied state: the leader asks a quorum whether it still leads (a
//! heartbeat round), then waits until it has applied everything committed before the read began.
//! A read served so reflects every write acknowledged before it, and is never older than a previous
//! read; a follower's local state can lag its leader's acknowledgements by a round trip.

use std::time::Duration;

use busbar_raft::RaftNode;
use busbar_types::{ApiError, ErrorCode};
use tonic::Status;

use crate::error::{self, api};

/// Bound on confirming leadership (one quorum round trip, or a wait for an election).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns once this node may answer a read from its applied state; NOT_LEADER (with the leader's
/// address) on a follower, REQUEST_TIMED_OUT when no quorum answers in time.
pub async fn confirm(node: &RaftNode) -> Result<(), Status> {
    match tokio::time::timeout(READ_TIMEOUT, node.raft.ensure_linearizable()).await {
        Err(_) => {
            Err(api(ErrorCode::RequestTimedOut, format!("no quorum confirmed leadership within {READ_TIMEOUT:?}")))
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(openraft::error::RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(error::status(error::not_leader(&f)))
        }
        Ok(Err(e)) => Err(error::status(ApiError::new(ErrorCode::LeaderNotAvailable, e.to_string()))),
    }
}
