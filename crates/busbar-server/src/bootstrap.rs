//! Cluster formation. `--peers`: a pristine node initializes the voter set unless a peer already
//! holds an initialized cluster, so the cluster is formed once whichever node starts first, and a
//! restarted node (which has a log) never initializes again. `--join`: a pristine node asks the
//! cluster to add it (learner, catch up, voter), following leader redirects.

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
}

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
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
