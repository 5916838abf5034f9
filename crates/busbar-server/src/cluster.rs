//! Cluster administration (`busbar.v1.Cluster`): status of every node, adding and removing nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_proto::v1::cluster_client::ClusterClient;
use busbar_proto::v1::cluster_server::Cluster;
use busbar_raft::types::RaftMetrics;
use busbar_raft::types::{ClientWriteError, RaftError};
use busbar_raft::TypeConfig;
use busbar_raft::{BasicNode, RaftNode};
use busbar_types::{ErrorCode, NodeId};
use openraft::error::{ChangeMembershipError, ForwardToLeader};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::error::{self, api};

/// How long `cluster status` waits for each node to describe itself.
const STATUS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct ClusterService {
    node: RaftNode,
    advertise: String,
    limits: Limits,
    data_dir: std::path::PathBuf,
}

impl ClusterService {
    pub fn new(node: RaftNode, advertise: String, limits: Limits, data_dir: std::path::PathBuf) -> Self {
        Self { node, advertise, limits, data_dir }
    }

    fn local(&self) -> pb::NodeStatus {
        // Disk use is a report, not a check: a directory that cannot be read counts as 0.
        let disk_bytes = crate::metrics::dir_bytes(&self.data_dir, 0).unwrap_or(0);
        pb::NodeStatus {
            disk_bytes,
            apply_version: self.node.store.apply_version().unwrap_or(0),
            max_apply_version: busbar_storage::apply_version::APPLY_VERSION,
            ..local_status(&self.metrics(), &self.advertise)
        }
    }

    fn metrics(&self) -> RaftMetrics {
        self.node.raft.metrics().borrow().clone()
    }

    /// NOT_LEADER (with the leader's address) unless this node leads.
    fn require_leader(&self, m: &RaftMetrics) -> Result<(), Status> {
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let leader_node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        Err(error::status(error::not_leader(&ForwardToLeader { leader_id: m.current_leader, leader_node })))
    }
}

/// This node's own status, from its Raft metrics.
pub fn local_status(m: &RaftMetrics, addr: &str) -> pb::NodeStatus {
    let role = match m.state {
        ServerState::Leader => pb::NodeRole::Leader,
        ServerState::Follower => pb::NodeRole::Follower,
        ServerState::Learner => pb::NodeRole::Learner,
        ServerState::Candidate => pb::NodeRole::Candidate,
        ServerState::Shutdown => pb::NodeRole::Shutdown,
    };
    let membership = m.membership_config.membership();
    pb::NodeStatus {
        id: m.id,
        addr: addr.to_string(),
        role: role as i32,
        term: m.current_term,
        has_last_log_index: m.last_log_index.is_some(),
        last_log_index: m.last_log_index.unwrap_or(0),
        has_applied_index: m.last_applied.is_some(),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        has_leader: m.current_leader.is_some(),
        leader_id: m.current_leader.unwrap_or(0),
        reachable: true,
        initialized: m.last_log_index.is_some() || m.vote.leader_id().term > 0,
        voter: membership.voter_ids().any(|v| v == m.id),
        disk_bytes: 0,
        acknowledged: m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != m.id)
            .filter_map(|(id, matched)| matched.map(|l| (*id, l.index)))
            .collect(),
        // Filled in by `ClusterService::local`, which has the store.
        apply_version: 0,
        max_apply_version: 0,
    }
}

/// Runs a membership change, waiting its turn: openraft refuses a change while another is still in
/// its joint phase, and two operators (or two joining nodes) may well ask at once. The caller bounds
/// the total time with a timeout.
async fn one_change_at_a_time<F, Fut>(
    mut change: F,
) -> Result<ClientWriteResponse<TypeConfig>, RaftError<ClientWriteError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<ClientWriteResponse<TypeConfig>, RaftError<ClientWriteError>>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// One call of the Cluster service on the node at `addr`, bounded by `timeout` (sent as the
/// request's deadline too); any failure as a message.
async fn ask<Req, Resp, F, Fut>(addr: &str, timeout: Duration, req: Req, call: F) -> Result<Resp, String>
where
    F: FnOnce(ClusterClient<tonic::transport::Channel>, Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
{
    let ch = busbar_raft::network::channel(addr).map_err(|e| e.to_string())?;
    let mut req = Request::new(req);
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, call(ClusterClient::new(ch), req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(st)) => Err(st.message().to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Asks the node at `addr` for the status of every member, as it sees them.
pub async fn cluster_status(addr: &str, timeout: Duration) -> Result<pb::ClusterStatusResponse, String> {
    ask(addr, timeout, pb::ClusterStatusRequest {}, |mut c, r| async move { c.status(r).await }).await
}

/// Asks one node for its own status, bounded by `timeout`.
pub async fn probe(addr: &str, timeout: Duration) -> Result<pb::NodeStatus, String> {
    ask(addr, timeout, pb::LocalStatusRequest {}, |mut c, r| async move { c.local_status(r).await }).await
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn local_status(&self, _req: Request<pb::LocalStatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.local()))
    }

    async fn status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let m = self.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut probes = Vec::new();
        for (id, node) in membership.nodes() {
            let (id, addr) = (*id, node.addr.clone());
            if id == m.id {
                continue;
            }
            probes.push(tokio::spawn(async move { (id, addr.clone(), probe(&addr, STATUS_PROBE_TIMEOUT).await) }));
        }
        let mut nodes = BTreeMap::new();
        if membership.get_node(&m.id).is_some() || voters.is_empty() {
            nodes.insert(m.id, self.local());
        }
        for p in probes {
            let Ok((id, addr, res)) = p.await else { continue };
            let st = match res {
                Ok(mut st) => {
                    st.addr = addr;
                    st
                }
                Err(_) => {
                    pb::NodeStatus { id, addr, reachable: false, voter: voters.contains(&id), ..Default::default() }
                }
            };
            nodes.insert(id, st);
        }
        Ok(Response::new(pb::ClusterStatusResponse {
            nodes: nodes.into_values().collect(),
            has_leader: m.current_leader.is_some(),
            leader_id: m.current_leader.unwrap_or(0),
        }))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::AddNodeResponse>, Status> {
        let req = req.into_inner();
        if req.addr.is_empty() || req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
            return Err(api(ErrorCode::InvalidRequest, format!("node address {:?} is not HOST:PORT", req.addr)));
        }
        let m = self.metrics();
        self.require_leader(&m)?;
        let membership = m.membership_config.membership().clone();
        if let Some(existing) = membership.get_node(&req.id) {
            if existing.addr != req.addr {
                return Err(api(
                    ErrorCode::InvalidRequest,
                    format!(
                        "node {} is already a member at {}; remove it first to re-add it at {}",
                        req.id, existing.addr, req.addr
                    ),
                ));
            }
            if membership.voter_ids().any(|v| v == req.id) {
                return Ok(Response::new(pb::AddNodeResponse {}));
            }
        }
        // A node whose build cannot apply what this one can must not join: it would decode a
        // snapshot or entries of a newer apply version with older rules and silently diverge.
        // Asked of the node itself (it serves before it asks to join), against this build's
        // highest version, not only the cluster's current one, which the leader may raise next.
        let newest = busbar_storage::apply_version::APPLY_VERSION;
        match probe(&req.addr, STATUS_PROBE_TIMEOUT).await {
            Ok(st) if st.max_apply_version >= newest => {}
            Ok(st) => {
                return Err(api(
                    ErrorCode::InvalidRequest,
                    format!(
                        "node {} at {} runs a build that applies up to version {} (0: before apply versions); \
                         this cluster's build applies version {newest}: upgrade it before adding it",
                        req.id, req.addr, st.max_apply_version
                    ),
                ))
            }
            Err(e) => {
                return Err(api(
                    ErrorCode::MembershipChangeFailed,
                    format!(
                        "cannot reach node {} at {} to check its build ({e}); start it before adding it",
                        req.id, req.addr
                    ),
                ))
            }
        }
        let raft = &self.node.raft;
        let timeout = self.limits.add_node_timeout;
        // Learner first, blocking until it has caught up, then promotion: the new voter never
        // counts towards a quorum before it holds the log.
        let node = BasicNode::new(&req.addr);
        let added =
            tokio::time::timeout(timeout, one_change_at_a_time(|| raft.add_learner(req.id, node.clone(), true))).await;
        match added {
            Err(_) => {
                return Err(api(
                    ErrorCode::MembershipChangeFailed,
                    format!("node {} did not catch up within {timeout:?}; it stays a learner", req.id),
                ))
            }
            Ok(Err(e)) => return Err(error::status(error::from_write(e))),
            Ok(Ok(_)) => {}
        }
        let promoted = tokio::time::timeout(
            self.limits.write_timeout,
            one_change_at_a_time(|| {
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])), false)
            }),
        )
        .await;
        match promoted {
            Err(_) => Err(api(
                ErrorCode::Indeterminate,
                format!("promoting node {} timed out; it may have been promoted", req.id),
            )),
            Ok(Err(e)) => Err(error::status(error::from_write(e))),
            Ok(Ok(_)) => {
                tracing::info!(node = req.id, addr = %req.addr, "node added as voter");
                Ok(Response::new(pb::AddNodeResponse {}))
            }
        }
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let id = req.into_inner().id;
        let m = self.metrics();
        self.require_leader(&m)?;
        let membership = m.membership_config.membership().clone();
        let is_voter = membership.voter_ids().any(|v| v == id);
        if membership.get_node(&id).is_none() {
            return Ok(Response::new(pb::RemoveNodeResponse {}));
        }
        let change = if is_voter {
            if membership.voter_ids().count() == 1 {
                return Err(api(
                    ErrorCode::InvalidRequest,
                    format!("node {id} is the last voter; a cluster cannot remove it"),
                ));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let res = tokio::time::timeout(
            self.limits.write_timeout,
            one_change_at_a_time(|| self.node.raft.change_membership(change.clone(), false)),
        )
        .await;
        match res {
            Err(_) => {
                Err(api(ErrorCode::Indeterminate, format!("removing node {id} timed out; it may have been removed")))
            }
            Ok(Err(e)) => Err(error::status(error::from_write(e))),
            Ok(Ok(_)) => {
                tracing::info!(node = id, "node removed from the membership");
                Ok(Response::new(pb::RemoveNodeResponse {}))
            }
        }
    }
}
