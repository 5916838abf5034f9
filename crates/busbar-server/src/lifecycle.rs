//! `--auto-membership`: a node keeps its membership in step with its process, so that a manifest
//! scales the cluster by a number (compose services, a StatefulSet's replicas).
//!
//! - Every start: the node asks the cluster to count it as a voter ([`ensure_member`]). For a node
//!   that is one already this is a no-op answer; a node that left (or was removed) with its data
//!   kept is added back as a learner, catches up from its own log, and is promoted.
//! - A graceful stop of a node *outside the initial voter set* (`--peers`) first removes it from
//!   the membership ([`leave`]), while it still serves, so a two-voter cluster can still commit the
//!   change. The initial voters never leave on their own: a rolling restart or a full stop must
//!   not shrink the cluster's core, and a SIGTERM cannot tell a restart from a scale-down.
//!
//! A SIGKILLed or crashed node does not leave: it stays a (down) member until it comes back or an
//! operator runs `busbar cluster remove-node`.

use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_proto::v1::cluster_client::ClusterClient;
use busbar_proto::LEADER_ADDR_KEY;
use busbar_raft::RaftNode;
use busbar_types::NodeId;
use openraft::ServerState;
use tokio::sync::watch;

use crate::bootstrap::BootstrapError;

/// Rejoining retries for about ten minutes (the cluster may be electing, or still starting).
const JOIN_ATTEMPTS: u32 = 300;
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound on leaving at a graceful stop; below compose's and the StatefulSet's grace periods (30 s
/// and 60 s in deploy/), so the process still stops cleanly when the cluster cannot commit.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Asks the cluster, through any of `via` (following leader redirects), to count this node as a
/// voter. Returns once it does, when `stop` turns true, or with an error after the attempts.
pub async fn ensure_member(
    node: &RaftNode,
    advertise: &str,
    via: &[String],
    mut stop: watch::Receiver<bool>,
) -> Result<(), BootstrapError> {
    if via.is_empty() {
        // A cluster of this node alone: it is a voter of the membership it initialized.
        return Ok(());
    }
    let mut hint: Option<String> = None;
    let mut last = String::new();
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..JOIN_ATTEMPTS {
        if *stop.borrow() {
            return Ok(());
        }
        // Only a voter can lead, and the leader's own view of the membership is the cluster's.
        if node.raft.metrics().borrow().state == ServerState::Leader {
            tracing::info!("this node leads; it is a voter");
            return Ok(());
        }
        let target = hint.take().unwrap_or_else(|| via[attempt as usize % via.len()].clone());
        match add(&target, node.id, advertise).await {
            Ok(()) => {
                tracing::info!(via = %target, "the cluster counts this node as a voter");
                return Ok(());
            }
            // e.g. this id is a member at another address: asking again cannot help.
            Err(e) if e.refused => {
                return Err(BootstrapError::Join { addr: target, attempts: attempt + 1, last: e.msg })
            }
            Err(e) => {
                tracing::info!(attempt, via = %target, error = %e.msg, "asking to be a voter failed; retrying");
                last = e.msg;
                hint = e.leader;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    Err(BootstrapError::Join { addr: via.join(","), attempts: JOIN_ATTEMPTS, last })
}

/// Removes this node from the membership through the leader, within `timeout`. Best effort: a
/// cluster that cannot commit (no quorum) keeps the node as a member, which the log says.
pub async fn leave(node: &RaftNode, advertise: &str, timeout: Duration) {
    match tokio::time::timeout(timeout, leave_inner(node, advertise)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the membership; still a member"),
        Err(_) => tracing::warn!(?timeout, "leaving the membership timed out; it may still count this node"),
    }
}

async fn leave_inner(node: &RaftNode, advertise: &str) -> Result<(), String> {
    let mut backoff = Duration::from_millis(100);
    let mut hint: Option<String> = None;
    loop {
        let m = node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.get_node(&node.id).is_none() {
            tracing::info!("not a member; nothing to leave");
            return Ok(());
        }
        let leader_addr = m.current_leader.and_then(|l| {
            if l == node.id {
                Some(advertise.to_string())
            } else {
                membership.get_node(&l).map(|n| n.addr.clone())
            }
        });
        match hint.take().or(leader_addr) {
            Some(target) => match remove(&target, node.id).await {
                Ok(()) => {
                    tracing::info!(via = %target, "left the membership");
                    return Ok(());
                }
                // A refused request (the last voter cannot go) will be refused again.
                Err(e) if e.refused => return Err(e.msg),
                Err(e) => {
                    tracing::info!(via = %target, error = %e.msg, "leaving: retrying");
                    hint = e.leader;
                }
            },
            None => tracing::info!("leaving: no leader known yet; waiting"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct RpcError {
    msg: String,
    /// The leader's address, when the node asked was not the leader.
    leader: Option<String>,
    /// The request itself was refused (not a passing state such as an election).
    refused: bool,
}

impl RpcError {
    fn transport(e: impl std::fmt::Display) -> Self {
        Self { msg: e.to_string(), leader: None, refused: false }
    }

    fn status(st: tonic::Status) -> Self {
        let leader = st.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self { msg: st.message().to_string(), leader, refused: st.code() == tonic::Code::InvalidArgument }
    }
}

async fn add(target: &str, id: NodeId, advertise: &str) -> Result<(), RpcError> {
    let ch = busbar_raft::network::channel(target).map_err(RpcError::transport)?;
    ClusterClient::new(ch)
        .add_node(pb::AddNodeRequest { id, addr: advertise.to_string() })
        .await
        .map(|_| ())
        .map_err(RpcError::status)
}

async fn remove(target: &str, id: NodeId) -> Result<(), RpcError> {
    let ch = busbar_raft::network::channel(target).map_err(RpcError::transport)?;
    ClusterClient::new(ch).remove_node(pb::RemoveNodeRequest { id }).await.map(|_| ()).map_err(RpcError::status)
}
