//! Cluster formation. `--peers`: a pristine node initializes the voter set unless a peer already
//! holds an initialized cluster, so the cluster is formed once whichever node starts first, and a
//! restarted node (which has a log) never initializes again. `--join`: a pristine node asks the
//! cluster to add it (learner, catch up, voter), following leader redirects.
//!
//! Before either, and before it serves, a pristine node checks that the cluster does not remember
//! it ([`refuse_if_forgotten`]): an empty data directory under the id of a member that acknowledged
//! entries is a voter that forgot them (docs/operations.md, "The one hazard").

use std::collections::BTreeMap;
use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_proto::v1::cluster_client::ClusterClient;
use busbar_proto::LEADER_ADDR_KEY;
use busbar_raft::{BasicNode, RaftNode};
use busbar_types::NodeId;

use crate::cluster::probe;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("initializing the cluster: {0}")]
    Initialize(String),
    #[error("could not join the cluster through {addr} after {attempts} attempts: {last}")]
    Join { addr: String, attempts: u32, last: String },
    #[error("raft: {0}")]
    Fatal(String),
    #[error(
        "node {id} has an empty data directory, but the leader (node {leader} at {leader_addr}) says node {id} \
         acknowledged log entries up to index {index}: this node's data is gone. A member that forgot what it \
         acknowledged can help elect a leader that lacks acknowledged records, so it will not start. Remove it \
         first (`busbar cluster remove-node {id}`), then start it empty (docs/operations.md, \"Replacing a dead node\")"
    )]
    Forgotten { id: NodeId, leader: NodeId, leader_addr: String, index: u64 },
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A live node answers its own status in milliseconds; a peer that is not up yet refuses the
/// connection at once. This bounds the rest (a hung peer, or a socket bound but not served yet).
const FORGOTTEN_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A cluster-status call probes every member (1 s each at most, concurrently): room for that.
const FORGOTTEN_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Refuses to go on if this node is pristine (no Raft state on disk) and a leader reachable through
/// `contacts` lists it among the members that acknowledged entries. Best effort: with no leader
/// reachable (a cluster forming, or partitioned from us) there is nothing to ask, and a leader
/// elected after this node's data was lost no longer remembers its acknowledgements. Bounded: one
/// round of concurrent status calls to the contacts, and for a contact that is not the leader but
/// knows one, one cluster-status call through it.
pub async fn refuse_if_forgotten(node: &RaftNode, contacts: &[String]) -> Result<(), BootstrapError> {
    if node.raft.is_initialized().await.map_err(|e| BootstrapError::Fatal(e.to_string()))? {
        return Ok(());
    }
    let calls: Vec<_> = contacts
        .iter()
        .map(|addr| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let own = probe(&addr, FORGOTTEN_PROBE_TIMEOUT).await.ok()?;
                if own.role == pb::NodeRole::Leader as i32 {
                    return Some(own);
                }
                if !own.has_leader {
                    return None;
                }
                // Through a follower (`--join` names any member): the leader's own answer.
                let all = crate::cluster::cluster_status(&addr, FORGOTTEN_STATUS_TIMEOUT).await.ok()?;
                all.nodes.into_iter().find(|n| n.role == pb::NodeRole::Leader as i32 && n.reachable)
            })
        })
        .collect();
    // Several may claim to lead (one cut off from the others still thinks it does): the newest
    // term speaks for the cluster.
    let mut newest: Option<pb::NodeStatus> = None;
    for call in calls {
        let Ok(Some(leader)) = call.await else { continue };
        if newest.as_ref().is_none_or(|n| leader.term > n.term) {
            newest = Some(leader);
        }
    }
    if let Some(leader) = newest {
        if let Some(index) = leader.acknowledged.get(&node.id).copied() {
            return Err(BootstrapError::Forgotten {
                id: node.id,
                leader: leader.id,
                leader_addr: leader.addr.clone(),
                index,
            });
        }
    }
    Ok(())
}

/// Joining retries for about ten minutes, then gives up with an error (bounded, not forever).
const JOIN_ATTEMPTS: u32 = 300;
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(2);

pub async fn form_from_peers(node: &RaftNode, peers: &BTreeMap<NodeId, String>) -> Result<(), BootstrapError> {
    if node.raft.is_initialized().await.map_err(|e| BootstrapError::Fatal(e.to_string()))? {
        tracing::info!("raft state found on disk; not initializing");
        return Ok(());
    }
    for (id, addr) in peers {
        if *id == node.id {
            continue;
        }
        if let Ok(st) = probe(addr, PROBE_TIMEOUT).await {
            if st.initialized {
                tracing::info!(peer = id, "a peer already holds the cluster; waiting to be replicated to");
                return Ok(());
            }
        }
    }
    let members: BTreeMap<NodeId, BasicNode> = peers.iter().map(|(id, a)| (*id, BasicNode::new(a))).collect();
    match node.raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(voters = ?peers.keys().collect::<Vec<_>>(), "initialized the cluster");
            Ok(())
        }
        // Another node's initialization reached us first (it sent us a vote or entries): fine.
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(BootstrapError::Initialize(e.to_string())),
    }
}

/// Asks the cluster, through `via`, to add this node. Retries with backoff (the cluster may be
/// electing, or `via` may be down for a moment) and follows NOT_LEADER redirects.
pub async fn join(node: &RaftNode, advertise: &str, via: &str) -> Result<(), BootstrapError> {
    let mut target = via.to_string();
    let mut last = String::new();
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=JOIN_ATTEMPTS {
        let m = node.raft.metrics().borrow().clone();
        if m.membership_config.membership().voter_ids().any(|v| v == node.id) {
            tracing::info!("this node is a voter; join complete");
            return Ok(());
        }
        match add_self(&target, node.id, advertise).await {
            Ok(()) => {
                tracing::info!(via = %target, "joined the cluster");
                return Ok(());
            }
            Err((msg, leader)) => {
                tracing::info!(attempt, via = %target, error = %msg, "join attempt failed; retrying");
                last = msg;
                target = leader.unwrap_or_else(|| via.to_string());
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
    }
    Err(BootstrapError::Join { addr: via.to_string(), attempts: JOIN_ATTEMPTS, last })
}

async fn add_self(target: &str, id: NodeId, advertise: &str) -> Result<(), (String, Option<String>)> {
    let ch = busbar_raft::network::channel(target).map_err(|e| (e.to_string(), None))?;
    let mut client = ClusterClient::new(ch);
    match client.add_node(pb::AddNodeRequest { id, addr: advertise.to_string() }).await {
        Ok(_) => Ok(()),
        Err(st) => {
            let leader = st.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
            Err((st.message().to_string(), leader))
        }
    }
}
