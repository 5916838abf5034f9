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
    #[error(
        "node {id}'s Raft log ends at index {held}, but the leader (node {leader} at {leader_addr}, term {term}) says \
         node {id} acknowledged log entries up to index {index}: entries it had made durable are gone (a WAL segment \
         cut or lost within the synced mark's last period). A member that forgot what it acknowledged can help elect \
         a leader that lacks acknowledged records, so it will not start. Replace it: `busbar cluster remove-node \
         {id}`, empty its data directory, start it (docs/operations.md, \"Replacing a dead node\")"
    )]
    LostAcknowledged { id: NodeId, held: u64, leader: NodeId, leader_addr: String, term: u64, index: u64 },
}

/// What a node holds of the log when it starts, against what a leader says it acknowledged.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The highest index it holds (log end, purge point or applied index); `None`: pristine.
    end: Option<u64>,
    /// The term of its stored vote.
    term: u64,
}

/// The index `leader` says this node acknowledged, if that is more than the node holds now.
///
/// A pristine node holds nothing, so any acknowledgement means its data is gone. Otherwise only a
/// leader of this node's term or a later one is believed: a newer leader may legitimately have cut
/// entries this node acknowledged to an older one (never committed), and this node would have seen
/// that newer term before it could be cut. A node with no term yet is not judged.
fn lost_acknowledged(id: NodeId, held: Held, leader: &pb::NodeStatus) -> Option<u64> {
    let acked = *leader.acknowledged.get(&id)?;
    match held.end {
        None => Some(acked),
        Some(end) => (held.term > 0 && leader.term >= held.term && acked > end).then_some(acked),
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A live node answers its own status in milliseconds; a peer that is not up yet refuses the
/// connection at once. This bounds the rest (a hung peer, or a socket bound but not served yet).
const FORGOTTEN_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A cluster-status call probes every member (1 s each at most, concurrently): room for that.
const FORGOTTEN_STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// The whole check, for a node with Raft state. It runs before the node serves, while openraft's
/// election timer runs: a restarted voter hears no heartbeat meanwhile and, after its leader lease
/// and an election timeout (3 s at least with the defaults), would start a needless election. What
/// has not answered by then is not waited for (the check is best effort).
const RESTART_CHECK_BUDGET: Duration = Duration::from_secs(1);
/// The whole check for a pristine node (no election timer matters: it is in no membership yet).
const PRISTINE_CHECK_BUDGET: Duration = Duration::from_secs(4);

/// Refuses to go on if a leader reachable through `contacts` says this node acknowledged more of
/// the log than it holds now: a pristine node (no Raft state on disk, an empty data directory under
/// a member's id) that the leader lists at all, or a node whose log ends below what it acknowledged
/// (a WAL cut within the synced mark's last period, which recovery cannot tell from a torn tail).
/// Best effort: with no leader reachable (a cluster forming, or partitioned from us) there is
/// nothing to ask, and a leader elected after this node's data was lost no longer remembers its
/// acknowledgements. Bounded: one round of concurrent status calls to the contacts, and for a
/// contact that is not the leader but knows one, one cluster-status call through it.
pub async fn refuse_if_forgotten(node: &RaftNode, contacts: &[String]) -> Result<(), BootstrapError> {
    let held = if node.raft.is_initialized().await.map_err(|e| BootstrapError::Fatal(e.to_string()))? {
        let log_end = node.wal.last_index().or(node.wal.purged().map(|(i, _)| i)).unwrap_or(0);
        let term = node.raft.metrics().borrow().vote.leader_id().term;
        Held { end: Some(log_end.max(*node.applied.borrow())), term }
    } else {
        Held { end: None, term: 0 }
    };
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
    let budget = if held.end.is_some() { RESTART_CHECK_BUDGET } else { PRISTINE_CHECK_BUDGET };
    let deadline = tokio::time::Instant::now() + budget;
    let mut newest: Option<pb::NodeStatus> = None;
    for mut call in calls {
        let leader = match tokio::time::timeout_at(deadline, &mut call).await {
            Ok(Ok(Some(leader))) => leader,
            Ok(_) => continue,
            Err(_) => {
                call.abort();
                continue;
            }
        };
        if newest.as_ref().is_none_or(|n| leader.term > n.term) {
            newest = Some(leader);
        }
    }
    let Some(leader) = newest else { return Ok(()) };
    let Some(index) = lost_acknowledged(node.id, held, &leader) else { return Ok(()) };
    Err(match held.end {
        None => BootstrapError::Forgotten { id: node.id, leader: leader.id, leader_addr: leader.addr, index },
        Some(end) => BootstrapError::LostAcknowledged {
            id: node.id,
            held: end,
            leader: leader.id,
            leader_addr: leader.addr,
            term: leader.term,
            index,
        },
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(term: u64, acked: &[(NodeId, u64)]) -> pb::NodeStatus {
        pb::NodeStatus { id: 1, term, acknowledged: acked.iter().copied().collect(), ..Default::default() }
    }

    #[test]
    fn a_node_is_refused_only_for_acknowledgements_it_no_longer_holds() {
        let pristine = Held { end: None, term: 0 };
        assert_eq!(lost_acknowledged(3, pristine, &leader(5, &[(3, 0)])), Some(0), "any ack of a pristine node");
        assert_eq!(lost_acknowledged(3, pristine, &leader(5, &[(2, 40)])), None, "never acknowledged: a new node");
        let restarted = Held { end: Some(40), term: 5 };
        assert_eq!(lost_acknowledged(3, restarted, &leader(5, &[(3, 40)])), None, "holds all it acknowledged");
        assert_eq!(lost_acknowledged(3, restarted, &leader(5, &[(3, 55)])), Some(55), "its log was cut below its acks");
        assert_eq!(lost_acknowledged(3, restarted, &leader(6, &[(3, 55)])), Some(55));
        // A leader of an older term than the node has seen may remember acks a newer leader cut.
        assert_eq!(lost_acknowledged(3, restarted, &leader(4, &[(3, 55)])), None);
        assert_eq!(lost_acknowledged(3, Held { end: Some(40), term: 0 }, &leader(5, &[(3, 55)])), None);
    }
}
