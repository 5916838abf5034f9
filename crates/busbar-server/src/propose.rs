//! Proposing a command through Raft and waiting for its outcome: the one path every write of the
//! API, the group coordinator and its housekeeping takes.

use std::future::Future;
use std::time::Duration;

use busbar_raft::types::ClientWriteError;
use busbar_raft::{RaftNode, TypeConfig};
use busbar_types::{ApiError, Command, CommandResponse, ErrorCode};
use openraft::raft::ClientWriteResponse;
use tonic::Status;

use crate::error::{self, api};

#[derive(Clone)]
pub struct Proposer {
    pub node: RaftNode,
    /// How long a write waits for commit before it is reported as indeterminate.
    pub timeout: Duration,
}

impl Proposer {
    /// Proposes a command and waits for it to be committed and applied, within the timeout.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, Status> {
        let rx = self.propose(cmd).await?;
        self.outcome(rx).await
    }

    /// Hands a command to Raft without waiting: commands proposed one after another reach the log
    /// in that order.
    pub async fn propose(
        &self,
        cmd: Command,
    ) -> Result<
        impl Future<Output = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError>, impl Sized>>,
        Status,
    > {
        self.node
            .raft
            .client_write_ff(cmd)
            .await
            .map_err(|f| error::status(ApiError::new(ErrorCode::ShuttingDown, format!("raft is not running: {f}"))))
    }

    /// Waits for a proposed command's outcome. A timeout or a lost responder is indeterminate: the
    /// entry may still commit.
    pub async fn outcome<R, E>(&self, rx: R) -> Result<CommandResponse, Status>
    where
        R: Future<Output = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError>, E>>,
    {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(api(
                ErrorCode::Indeterminate,
                format!(
                    "no commit within {timeout:?}: the write may or may not have been committed (leader change or lost quorum)"
                ),
            )),
            Ok(Err(_)) => Err(api(
                ErrorCode::Indeterminate,
                "the leader stopped before answering: the write may or may not have been committed",
            )),
            Ok(Ok(Err(e))) => Err(error::status(error::from_write(openraft::error::RaftError::APIError(e)))),
            Ok(Ok(Ok(resp))) => match resp.data {
                CommandResponse::Rejected { code, message } => Err(api(code, message)),
                other => Ok(other),
            },
        }
    }
}
