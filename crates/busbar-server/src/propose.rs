//! Proposing a command through Raft and waiting for its outcome: the one path every write of the
//! API, the group coordinator and its housekeeping takes.
//!
//! Writes are coalesced. openraft 0.9's core makes each entry durable (our WAL's fdatasync) before
//! it reads the next client write, so one entry per request caps a node at one request per
//! fdatasync. Instead a single batcher task takes the queued commands and proposes them as one
//! [`Command::Batch`] entry, with at most [`MAX_ENTRIES_IN_FLIGHT`] entries awaiting commit: while
//! they are, new writes queue up and go together in the next entry. A lone write is proposed at
//! once (no linger), so light load keeps its latency; heavy load gets fewer, larger entries.
//!
//! Order is kept: commands reach the log in the order they were handed to [`Proposer::propose`]
//! (one queue, one task proposing entries one after another), which the produce stream relies on
//! for an idempotent producer's sequence numbers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use busbar_raft::types::{ClientWriteError, Raft};
use busbar_raft::{RaftNode, TypeConfig};
use busbar_types::{ApiError, Command, CommandResponse, ErrorCode};
use openraft::raft::ClientWriteResponse;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use crate::error::{self, api};

/// Commands waiting for the batcher; a full queue makes [`Proposer::propose`] wait (bounded by
/// the write timeout).
const QUEUE_COMMANDS: usize = 8192;
/// Entries proposed and not yet committed at once. More entries in flight means smaller ones,
/// each paying an fdatasync on every node; fewer means less overlap between the leader's and the
/// followers' work. Measured with 512 one-record requests in flight on 3 nodes (busbar-load
/// per-request, a busy 2-core machine): 1 slot 6.4k-8.1k rec/s, 2 slots 8.6k-10.7k, 4 slots
/// 6.3k-8.9k, 16 slots 5.9k, 64 slots 3.9k.
pub const MAX_ENTRIES_IN_FLIGHT: usize = 2;
/// Most commands in one entry.
const MAX_BATCH_COMMANDS: usize = 4096;
/// Most bytes (estimated) of commands in one entry; a single larger command travels alone. Kept
/// under the replication message cap so one entry fits one AppendEntries.
const MAX_BATCH_BYTES: usize = 2 << 20;

/// The outcome of one proposed command, as the batcher delivers it.
type Outcome = Result<CommandResponse, Status>;

struct Queued {
    cmd: Command,
    bytes: usize,
    reply: oneshot::Sender<Outcome>,
}

/// A command handed to the batcher; [`Proposer::outcome`] waits for it.
pub struct Proposal {
    rx: oneshot::Receiver<Outcome>,
}

/// Hands commands to Raft (coalesced, see the module documentation) and waits for their outcome.
/// Cheap to clone: every clone feeds the same batcher task, which ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Queued>,
    /// How long a write waits (queued, proposed and committed) before it is reported as
    /// indeterminate.
    timeout: Duration,
}

impl Proposer {
    /// Starts the batcher task for `node`.
    pub fn start(node: RaftNode, timeout: Duration) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_COMMANDS);
        tokio::spawn(batcher(node.raft, rx, timeout));
        Self { queue, timeout }
    }

    /// Proposes a command and waits for it to be committed and applied, within the timeout.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, Status> {
        let p = self.propose(cmd).await?;
        self.outcome(p).await
    }

    /// Queues a command without waiting for its commit: commands proposed one after another
    /// reach the log in that order. Fails only if the queue stays full for the whole timeout (the
    /// command was then not proposed) or the node is stopping.
    pub async fn propose(&self, cmd: Command) -> Result<Proposal, Status> {
        let (reply, rx) = oneshot::channel();
        let bytes = approx_bytes(&cmd);
        match tokio::time::timeout(self.timeout, self.queue.send(Queued { cmd, bytes, reply })).await {
            Ok(Ok(())) => Ok(Proposal { rx }),
            Ok(Err(_)) => Err(api(ErrorCode::ShuttingDown, "the node is stopping: the write was not proposed")),
            Err(_) => Err(api(
                ErrorCode::RequestTimedOut,
                format!("the write queue stayed full for {:?}: the write was not proposed", self.timeout),
            )),
        }
    }

    /// Waits for a proposed command's outcome. A timeout or a lost answer is indeterminate: the
    /// entry may still commit.
    pub async fn outcome(&self, p: Proposal) -> Result<CommandResponse, Status> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, p.rx).await {
            Err(_) => Err(indeterminate_timeout(timeout)),
            Ok(Err(_)) => Err(api(
                ErrorCode::Indeterminate,
                "the leader stopped before answering: the write may or may not have been committed",
            )),
            Ok(Ok(outcome)) => outcome,
        }
    }
}

fn indeterminate_timeout(timeout: Duration) -> Status {
    api(
        ErrorCode::Indeterminate,
        format!(
            "no commit within {timeout:?}: the write may or may not have been committed (leader change or lost quorum)"
        ),
    )
}

/// Estimated bytes a command adds to an entry.
fn approx_bytes(cmd: &Command) -> usize {
    match cmd {
        Command::Produce { records, .. } => 64 + records.len(),
        Command::Batch(cmds) => cmds.iter().map(approx_bytes).sum(),
        _ => 256,
    }
}

/// The one task that turns queued commands into entries.
async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Queued>, timeout: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return, // every Proposer is gone
            },
        };
        // Waiting for a slot is what lets the next entry gather the writes that arrive meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS {
            match rx.try_recv() {
                Ok(q) if bytes + q.bytes > MAX_BATCH_BYTES => {
                    carried = Some(q);
                    break;
                }
                Ok(q) => {
                    bytes += q.bytes;
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        let (cmds, replies): (Vec<Command>, Vec<oneshot::Sender<Outcome>>) =
            batch.into_iter().map(|q| (q.cmd, q.reply)).unzip();
        let single = cmds.len() == 1;
        let mut cmds = cmds;
        let cmd = if single { cmds.swap_remove(0) } else { Command::Batch(cmds) };
        crate::metrics::proposals().observe(replies.len());
        match raft.client_write_ff(cmd).await {
            Err(f) => {
                let st = error::status(ApiError::new(ErrorCode::ShuttingDown, format!("raft is not running: {f}")));
                for r in replies {
                    let _ = r.send(Err(st.clone()));
                }
            }
            Ok(commit) => {
                tokio::spawn(async move {
                    deliver(commit, replies, single, timeout).await;
                    drop(slot);
                });
            }
        }
    }
}

/// Waits (bounded) for an entry's commit and hands each command its own answer.
async fn deliver<E>(
    commit: impl Future<Output = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError>, E>>,
    replies: Vec<oneshot::Sender<Outcome>>,
    single: bool,
    timeout: Duration,
) {
    let all = |replies: Vec<oneshot::Sender<Outcome>>, st: Status| {
        for r in replies {
            let _ = r.send(Err(st.clone()));
        }
    };
    let resp = match tokio::time::timeout(timeout, commit).await {
        Err(_) => return all(replies, indeterminate_timeout(timeout)),
        Ok(Err(_)) => {
            return all(
                replies,
                api(
                    ErrorCode::Indeterminate,
                    "the leader stopped before answering: the write may or may not have been committed",
                ),
            )
        }
        Ok(Ok(Err(e))) => {
            return all(replies, error::status(error::from_write(openraft::error::RaftError::APIError(e))));
        }
        Ok(Ok(Ok(resp))) => resp.data,
    };
    let answers = match resp {
        CommandResponse::Batch(answers) if !single && answers.len() == replies.len() => answers,
        one if single => vec![one],
        other => {
            let st = api(
                ErrorCode::UnknownServerError,
                format!("the state machine answered a batch of {} commands with {other:?}", replies.len()),
            );
            return all(replies, st);
        }
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(match answer {
            CommandResponse::Rejected { code, message } => Err(api(code, message)),
            other => Ok(other),
        });
    }
}
