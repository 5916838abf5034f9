//! The consumer-group coordinator (`busbar.v1.Groups`), on the Raft leader.
//!
//! Group state (members, assignments, generations, committed offsets) is replicated: every change is
//! a command in the log (see `busbar_storage::groups`). What is *not* replicated is liveness, which
//! this module keeps in the leader's memory: when each member last heartbeated, and which generation
//! it has acknowledged. From those it proposes `LeaveGroup` for a member whose session expired and
//! `CompleteRebalance` once every member that had to give up partitions has acknowledged. A new
//! leader starts with empty liveness tables: every member gets a full session timeout of grace.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use busbar_proto::v1 as pb;
use busbar_proto::v1::groups_server::Groups;
use busbar_raft::types::RaftMetrics;
use busbar_raft::RaftNode;
use busbar_storage::GroupView;
use busbar_types::{Command, ErrorCode, GroupName, OffsetReset, TopicName};
use openraft::error::ForwardToLeader;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::error::{self, api};
use crate::propose::Proposer;
use crate::read_index;

/// How often the coordinator looks for expired sessions and completed revocations.
const TICK: Duration = Duration::from_millis(200);

type MemberKey = (String, String);

#[derive(Default)]
struct Liveness {
    /// The term in which this node led at the last look (`None`: not leading). Any change — losing
    /// leadership, or winning it again in a later term, even between two ticks — resets the tables.
    leading_term: Option<u64>,
    last_seen: HashMap<MemberKey, Instant>,
    acked: HashMap<MemberKey, u64>,
    /// Completions and expiries proposed and not yet seen applied, so each is proposed once.
    in_flight: HashSet<(String, String, u64)>,
}

#[derive(Clone)]
pub struct GroupsService {
    inner: Arc<Coordinator>,
}

pub struct Coordinator {
    node: RaftNode,
    proposer: Proposer,
    live: Mutex<Liveness>,
    member_seq: AtomicU64,
}

fn group_name(name: &str) -> Result<GroupName, Status> {
    TopicName::new(name).map_err(|e| api(ErrorCode::InvalidGroupId, format!("group id: {e}")))
}

fn tps(list: &[(String, u32)]) -> Vec<pb::TopicPartition> {
    list.iter().map(|(t, p)| pb::TopicPartition { topic: t.clone(), partition: *p }).collect()
}

impl GroupsService {
    pub fn new(node: RaftNode, proposer: Proposer) -> Self {
        Self {
            inner: Arc::new(Coordinator {
                node,
                proposer,
                live: Mutex::new(Liveness::default()),
                member_seq: AtomicU64::new(0),
            }),
        }
    }

    /// The coordinator's housekeeping loop; runs until `shutdown` changes.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
            self.inner.tick().await;
        }
    }
}

impl Coordinator {
    fn metrics(&self) -> RaftMetrics {
        self.node.raft.metrics().borrow().clone()
    }

    /// NOT_LEADER (with the leader's address) unless this node leads: the coordinator is the leader.
    fn require_leader(&self) -> Result<(), Status> {
        let m = self.metrics();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let leader_node = m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        Err(error::status(error::not_leader(&ForwardToLeader { leader_id: m.current_leader, leader_node })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn group_view(&self, group: &str) -> Result<Option<GroupView>, Status> {
        self.node.store.group(group).map_err(|e| error::status(error::from_store(e)))
    }

    fn new_member_id(&self, group: &str) -> String {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let seq = self.member_seq.fetch_add(1, Ordering::Relaxed);
        format!("{group}-{}-{nanos:x}-{seq}", self.node.id)
    }

    /// Records a member's heartbeat, and proposes the completion of its group's rebalance when this
    /// was the last acknowledgement missing.
    async fn saw(&self, group: &str, member: &str, acked_generation: Option<u64>) {
        {
            let mut live = self.lock();
            let key = (group.to_string(), member.to_string());
            live.last_seen.insert(key.clone(), Instant::now());
            if let Some(g) = acked_generation {
                let e = live.acked.entry(key).or_insert(0);
                *e = (*e).max(g);
            }
        }
        self.complete_rebalances(Some(group)).await;
    }

    async fn complete_rebalances(&self, only: Option<&str>) {
        let Ok(groups) = self.node.store.rebalancing_groups() else { return };
        for (group, generation, revokers) in groups {
            if only.is_some_and(|o| o != group) {
                continue;
            }
            let ready = {
                let mut live = self.lock();
                let all_acked = revokers
                    .iter()
                    .all(|m| live.acked.get(&(group.clone(), m.clone())).is_some_and(|g| *g >= generation));
                all_acked && live.in_flight.insert((group.clone(), String::new(), generation))
            };
            if !ready {
                continue;
            }
            let Ok(name) = TopicName::new(group.clone()) else { continue };
            let res = self.proposer.write(Command::CompleteRebalance { group: name, generation }).await;
            self.lock().in_flight.remove(&(group.clone(), String::new(), generation));
            if let Err(st) = res {
                tracing::debug!(%group, generation, status = %st, "completing a rebalance failed; will retry");
            }
        }
    }

    /// Expires members whose session ran out and completes rebalances; only while this node leads.
    async fn tick(&self) {
        let m = self.metrics();
        let leading_term = (m.state == ServerState::Leader).then_some(m.current_term);
        {
            let mut live = self.lock();
            if leading_term != live.leading_term {
                // A new term of leadership (or none): nobody's liveness is known; start afresh.
                *live = Liveness { leading_term, ..Liveness::default() };
            }
        }
        if leading_term.is_none() {
            return;
        }
        let Ok(members) = self.node.store.group_members() else { return };
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut live = self.lock();
            let present: HashSet<MemberKey> = members.iter().map(|(g, m, _)| (g.clone(), m.clone())).collect();
            live.last_seen.retain(|k, _| present.contains(k));
            live.acked.retain(|k, _| present.contains(k));
            for (g, m, timeout_ms) in members {
                let key = (g.clone(), m.clone());
                // First sight (a new member, or a new leader): a full session of grace.
                let seen = *live.last_seen.entry(key).or_insert(now);
                if now.duration_since(seen) > Duration::from_millis(u64::from(timeout_ms))
                    && live.in_flight.insert((g.clone(), m.clone(), 0))
                {
                    expired.push((g, m));
                }
            }
        }
        for (g, m) in expired {
            tracing::info!(group = %g, member = %m, "session expired; removing the member");
            if let Ok(name) = TopicName::new(g.clone()) {
                if let Err(st) = self.proposer.write(Command::LeaveGroup { group: name, member_id: m.clone() }).await {
                    tracing::debug!(group = %g, member = %m, status = %st, "expiring a member failed; will retry");
                }
            }
            self.lock().in_flight.remove(&(g, m, 0));
        }
        self.complete_rebalances(None).await;
    }

    fn member_assignment(&self, group: &str, member: &str) -> Result<(u64, bool, Vec<pb::TopicPartition>), Status> {
        let view =
            self.group_view(group)?.ok_or_else(|| api(ErrorCode::UnknownMemberId, format!("no group {group}")))?;
        let m = view.members.iter().find(|m| m.id == member).ok_or_else(|| {
            api(ErrorCode::UnknownMemberId, format!("member {member} is not in group {group}; join again"))
        })?;
        Ok((view.generation, view.rebalancing, tps(&m.assigned)))
    }
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn join_group(&self, req: Request<pb::JoinGroupRequest>) -> Result<Response<pb::JoinGroupResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let req = req.into_inner();
        let group = group_name(&req.group)?;
        if req.topics.is_empty() {
            return Err(api(ErrorCode::InvalidRequest, "a member must subscribe to at least one topic"));
        }
        let topics = req
            .topics
            .iter()
            .map(|t| TopicName::new(t.clone()).map_err(|e| api(ErrorCode::InvalidTopic, e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let member_id = if req.member_id.is_empty() { c.new_member_id(group.as_str()) } else { req.member_id };
        c.proposer
            .write(Command::JoinGroup {
                group: group.clone(),
                member_id: member_id.clone(),
                topics,
                session_timeout_ms: req.session_timeout_ms,
            })
            .await?;
        c.saw(group.as_str(), &member_id, None).await;
        let (generation, _, assigned) = c.member_assignment(group.as_str(), &member_id)?;
        let heartbeat_interval_ms = (req.session_timeout_ms / 4).clamp(100, 3_000);
        Ok(Response::new(pb::JoinGroupResponse { member_id, generation, assigned, heartbeat_interval_ms }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let req = req.into_inner();
        let group = group_name(&req.group)?;
        // Unknown member: it was removed (or never joined); the client must join again.
        c.member_assignment(group.as_str(), &req.member_id)?;
        c.saw(group.as_str(), &req.member_id, Some(req.generation)).await;
        let (generation, rebalancing, assigned) = c.member_assignment(group.as_str(), &req.member_id)?;
        Ok(Response::new(pb::HeartbeatResponse { generation, assigned, rebalancing }))
    }

    async fn leave_group(
        &self,
        req: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let req = req.into_inner();
        let group = group_name(&req.group)?;
        c.proposer.write(Command::LeaveGroup { group, member_id: req.member_id }).await?;
        Ok(Response::new(pb::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        req: Request<pb::CommitOffsetsRequest>,
    ) -> Result<Response<pb::CommitOffsetsResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let req = req.into_inner();
        let group = group_name(&req.group)?;
        let offsets = req
            .offsets
            .into_iter()
            .map(|o| {
                Ok((
                    TopicName::new(o.topic).map_err(|e| api(ErrorCode::InvalidTopic, e.to_string()))?,
                    o.partition,
                    o.offset,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        c.proposer
            .write(Command::CommitOffsets {
                group: group.clone(),
                member_id: req.member_id.clone(),
                generation: req.generation,
                offsets,
            })
            .await?;
        // A commit is a sign of life too.
        c.saw(group.as_str(), &req.member_id, None).await;
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn describe_group(
        &self,
        req: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let c = &self.inner;
        let group = group_name(&req.into_inner().group)?;
        read_index::confirm(&c.node).await?;
        let view = c
            .group_view(group.as_str())?
            .ok_or_else(|| api(ErrorCode::GroupIdNotFound, format!("no group {group}")))?;
        Ok(Response::new(pb::DescribeGroupResponse {
            group: view.name.clone(),
            generation: view.generation,
            rebalancing: view.rebalancing,
            members: view
                .members
                .iter()
                .map(|m| pb::GroupMember {
                    member_id: m.id.clone(),
                    topics: m.topics.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    assigned: tps(&m.assigned),
                    revoking: tps(&m.revoking),
                })
                .collect(),
            partitions: view
                .partitions
                .iter()
                .map(|p| pb::GroupPartition {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    has_committed: p.committed.is_some(),
                    committed: p.committed.unwrap_or(0),
                    start_offset: p.start_offset,
                    end_offset: p.end_offset,
                    lag: p.lag(),
                    owner: p.owner.clone().unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn list_groups(
        &self,
        _req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let c = &self.inner;
        read_index::confirm(&c.node).await?;
        let groups = c.node.store.group_names().map_err(|e| error::status(error::from_store(e)))?;
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn reset_offsets(
        &self,
        req: Request<pb::ResetOffsetsRequest>,
    ) -> Result<Response<pb::ResetOffsetsResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let req = req.into_inner();
        let group = group_name(&req.group)?;
        let topic = TopicName::new(req.topic).map_err(|e| api(ErrorCode::InvalidTopic, e.to_string()))?;
        let to = match req.to {
            Some(pb::reset_offsets_request::To::Earliest(true)) => OffsetReset::Earliest,
            Some(pb::reset_offsets_request::To::Latest(true)) => OffsetReset::Latest,
            Some(pb::reset_offsets_request::To::Offset(o)) => OffsetReset::Offset(o),
            _ => return Err(api(ErrorCode::InvalidRequest, "say where to reset to: earliest, latest or an offset")),
        };
        c.proposer.write(Command::ResetOffsets { group, topic, to }).await?;
        Ok(Response::new(pb::ResetOffsetsResponse {}))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let c = &self.inner;
        c.require_leader()?;
        let group = group_name(&req.into_inner().group)?;
        c.proposer.write(Command::DeleteGroup { group }).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}
