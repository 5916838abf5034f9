//! Consumer groups as replicated state: members, their assignments, the generation, and committed
//! offsets. Changed only by commands applied from the Raft log, so every node holds the same groups
//! and a new leader takes over a group exactly where the old one left it. Liveness (heartbeats,
//! session expiry, acknowledgements of revocations) is the coordinator's business on the leader; it
//! turns what it sees into these commands.

use std::collections::{BTreeMap, BTreeSet};

use busbar_types::{CommandResponse, ErrorCode, OffsetReset, TopicName};
use serde::{Deserialize, Serialize};

use crate::group_assign::{self, MemberLoad, Tp};
use crate::topic_store::{PartitionState, TopicMeta};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    pub topics: BTreeSet<TopicName>,
    pub session_timeout_ms: u32,
    /// Partitions the member consumes.
    pub assigned: BTreeSet<Tp>,
    /// Partitions taken from it in this generation: it may still commit them until it acknowledges.
    pub revoking: BTreeSet<Tp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Bumped whenever any member's assignment changes.
    pub generation: u64,
    pub members: BTreeMap<String, MemberState>,
    /// Partitions being revoked, and the member each goes to once released.
    pub pending: BTreeMap<Tp, String>,
    /// The next offset to consume, per partition.
    pub committed: BTreeMap<Tp, u64>,
}

/// What group logic needs to know of the topics.
pub struct Topics<'a> {
    pub by_name: &'a BTreeMap<TopicName, TopicMeta>,
    pub partitions: &'a std::collections::HashMap<(u32, u32), PartitionState>,
}

impl Topics<'_> {
    fn eligible(&self, topics: &BTreeSet<TopicName>) -> BTreeSet<Tp> {
        topics
            .iter()
            .filter_map(|t| self.by_name.get(t))
            .flat_map(|t| (0..t.partitions).map(move |p| (t.id, p)))
            .collect()
    }
}

fn rejected(code: ErrorCode, message: String) -> CommandResponse {
    CommandResponse::Rejected { code, message }
}

/// Session timeouts a member may ask for: long enough not to expire on a GC pause or a loaded
/// machine, short enough that a dead member's partitions do not sit idle for long.
pub const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 1_000..=300_000;

impl GroupState {
    /// Brings assignments in line with the members and their subscriptions (phase 1 of a cooperative
    /// rebalance); bumps the generation if anything changed.
    fn rebalance(&mut self, topics: &Topics<'_>) {
        let loads = self.loads(topics);
        let plan = group_assign::plan(&loads);
        let mut changed = false;
        for (id, (assigned, revoking)) in plan.members {
            if let Some(m) = self.members.get_mut(&id) {
                if m.assigned != assigned || m.revoking != revoking {
                    changed = true;
                    m.assigned = assigned;
                    m.revoking = revoking;
                }
            }
        }
        if self.pending != plan.pending {
            changed = true;
            self.pending = plan.pending;
        }
        if changed {
            self.generation += 1;
        }
    }

    /// What the assignor needs of each member: the partitions it may take and those it holds.
    fn loads(&self, topics: &Topics<'_>) -> BTreeMap<String, MemberLoad> {
        self.members
            .iter()
            .map(|(id, m)| {
                let load = MemberLoad {
                    eligible: topics.eligible(&m.topics),
                    assigned: m.assigned.clone(),
                    revoking: m.revoking.clone(),
                };
                (id.clone(), load)
            })
            .collect()
    }

    pub fn is_rebalancing(&self) -> bool {
        self.members.values().any(|m| !m.revoking.is_empty())
    }

    pub fn join(
        &mut self,
        member_id: &str,
        subscribed: &[TopicName],
        session_timeout_ms: u32,
        topics: &Topics<'_>,
    ) -> CommandResponse {
        if member_id.is_empty() {
            return rejected(ErrorCode::UnknownMemberId, "a member id is required".into());
        }
        if !SESSION_TIMEOUT_MS.contains(&session_timeout_ms) {
            return rejected(
                ErrorCode::InvalidSessionTimeout,
                format!(
                    "session timeout {session_timeout_ms} ms is outside {}..={} ms",
                    SESSION_TIMEOUT_MS.start(),
                    SESSION_TIMEOUT_MS.end()
                ),
            );
        }
        let m = self.members.entry(member_id.to_string()).or_default();
        m.topics = subscribed.iter().cloned().collect();
        m.session_timeout_ms = session_timeout_ms;
        self.rebalance(topics);
        CommandResponse::GroupChanged { generation: self.generation }
    }

    pub fn leave(&mut self, member_id: &str, topics: &Topics<'_>) -> CommandResponse {
        if self.members.remove(member_id).is_none() {
            return rejected(ErrorCode::UnknownMemberId, format!("member {member_id} is not in the group"));
        }
        self.pending.retain(|_, to| to != member_id);
        self.generation += 1;
        self.rebalance(topics);
        CommandResponse::GroupChanged { generation: self.generation }
    }

    pub fn complete(&mut self, generation: u64, topics: &Topics<'_>) -> CommandResponse {
        // A completion for an older generation was overtaken by another change; that change planned
        // afresh, so this one has nothing left to do.
        if generation != self.generation || !self.is_rebalancing() {
            return CommandResponse::GroupChanged { generation: self.generation };
        }
        let loads = self.loads(topics);
        let done = group_assign::complete(&loads, &self.pending);
        for (id, assigned) in done {
            if let Some(m) = self.members.get_mut(&id) {
                m.assigned = assigned;
                m.revoking.clear();
            }
        }
        self.pending.clear();
        self.generation += 1;
        CommandResponse::GroupChanged { generation: self.generation }
    }

    pub fn commit(
        &mut self,
        member_id: &str,
        generation: u64,
        offsets: &[(TopicName, u32, u64)],
        topics: &Topics<'_>,
    ) -> CommandResponse {
        let Some(m) = self.members.get(member_id) else {
            return rejected(ErrorCode::UnknownMemberId, format!("member {member_id} is not in the group; join again"));
        };
        if generation != self.generation {
            return rejected(
                ErrorCode::IllegalGeneration,
                format!("commit for generation {generation}; the group is at generation {}", self.generation),
            );
        }
        let mut resolved = Vec::with_capacity(offsets.len());
        for (topic, partition, offset) in offsets {
            let Some(t) = topics.by_name.get(topic) else {
                return rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {topic}"));
            };
            let tp = (t.id, *partition);
            if !m.assigned.contains(&tp) && !m.revoking.contains(&tp) {
                return rejected(
                    ErrorCode::IllegalGeneration,
                    format!("{topic}/{partition} is not assigned to member {member_id} in generation {generation}"),
                );
            }
            let end = topics.partitions.get(&tp).map_or(0, |s| s.end_offset);
            if *offset > end {
                return rejected(
                    ErrorCode::OffsetOutOfRange,
                    format!("offset {offset} of {topic}/{partition} is beyond its end offset {end}"),
                );
            }
            resolved.push((tp, *offset));
        }
        self.committed.extend(resolved);
        CommandResponse::GroupChanged { generation: self.generation }
    }

    pub fn reset(&mut self, topic: &TopicName, to: OffsetReset, topics: &Topics<'_>) -> CommandResponse {
        if !self.members.is_empty() {
            return rejected(
                ErrorCode::NonEmptyGroup,
                format!("the group has {} active member(s); stop them before resetting offsets", self.members.len()),
            );
        }
        let Some(t) = topics.by_name.get(topic) else {
            return rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {topic}"));
        };
        for p in 0..t.partitions {
            let st = topics.partitions.get(&(t.id, p)).copied().unwrap_or_default();
            let offset = match to {
                OffsetReset::Earliest => st.start_offset,
                OffsetReset::Latest => st.end_offset,
                OffsetReset::Offset(o) => {
                    if o < st.start_offset || o > st.end_offset {
                        return rejected(
                            ErrorCode::OffsetOutOfRange,
                            format!(
                                "offset {o} is out of range for {topic}/{p}: valid offsets are {}..={}",
                                st.start_offset, st.end_offset
                            ),
                        );
                    }
                    o
                }
            };
            self.committed.insert((t.id, p), offset);
        }
        CommandResponse::GroupChanged { generation: self.generation }
    }

    /// Retention moved a partition's start: a committed offset below it now points at nothing, so
    /// the group resumes at the start. Returns whether anything changed.
    pub fn clamp_committed(&mut self, tp: Tp, start: u64) -> bool {
        match self.committed.get_mut(&tp) {
            Some(c) if *c < start => {
                *c = start;
                true
            }
            _ => false,
        }
    }

    /// A topic was created or deleted: drop what refers to a deleted topic and rebalance.
    pub fn topics_changed(&mut self, topics: &Topics<'_>) {
        let live: BTreeSet<u32> = topics.by_name.values().map(|t| t.id).collect();
        self.committed.retain(|(tid, _), _| live.contains(tid));
        for m in self.members.values_mut() {
            m.assigned.retain(|(tid, _)| live.contains(tid));
            m.revoking.retain(|(tid, _)| live.contains(tid));
        }
        self.pending.retain(|(tid, _), _| live.contains(tid));
        self.rebalance(topics);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn topic_map(parts: u32) -> (BTreeMap<TopicName, TopicMeta>, HashMap<(u32, u32), PartitionState>) {
        let name = TopicName::new("t").unwrap();
        let t = TopicMeta { id: 7, name: name.clone(), partitions: parts, config: Default::default() };
        let states =
            (0..parts).map(|p| ((7, p), PartitionState { start_offset: 0, end_offset: 100, bytes: 0 })).collect();
        (BTreeMap::from([(name, t)]), states)
    }

    #[test]
    fn join_rebalance_commit_fencing_and_reset() {
        let (by_name, partitions) = topic_map(6);
        let topics = Topics { by_name: &by_name, partitions: &partitions };
        let t = vec![TopicName::new("t").unwrap()];
        let mut g = GroupState::default();
        // Each join revokes from the earlier members; the coordinator completes the rebalance once
        // they acknowledge, as here.
        for m in ["a", "b", "c"] {
            g.join(m, &t, 10_000, &topics);
            g.complete(g.generation, &topics);
        }
        assert!(g.members.values().all(|m| m.assigned.len() == 2), "{g:?}");
        let gen = g.generation;
        // Joining a fourth member revokes exactly one partition; the rest keep consuming.
        g.join("d", &t, 10_000, &topics);
        assert!(g.is_rebalancing());
        assert_eq!(g.members.values().map(|m| m.revoking.len()).sum::<usize>(), 1);
        assert!(g.generation > gen);
        // A commit from the old generation is fenced; one from the current generation by the
        // revoking member, for the partition it is losing, is accepted.
        let (loser, m) =
            g.members.iter().find(|(_, m)| !m.revoking.is_empty()).map(|(k, v)| (k.clone(), v.clone())).unwrap();
        let &(_, p) = m.revoking.iter().next().unwrap();
        let stale = g.commit(&loser, gen, &[(t[0].clone(), p, 5)], &topics);
        assert!(matches!(stale, CommandResponse::Rejected { code: ErrorCode::IllegalGeneration, .. }));
        let ok = g.commit(&loser, g.generation, &[(t[0].clone(), p, 5)], &topics);
        assert!(matches!(ok, CommandResponse::GroupChanged { .. }), "{ok:?}");
        // Completing hands it to d.
        g.complete(g.generation, &topics);
        assert!(!g.is_rebalancing());
        assert!(g.members["d"].assigned.contains(&(7, p)));
        // Unknown members, foreign partitions and offsets beyond the end are refused.
        assert!(matches!(
            g.commit("zz", g.generation, &[], &topics),
            CommandResponse::Rejected { code: ErrorCode::UnknownMemberId, .. }
        ));
        assert!(matches!(
            g.commit(&loser, g.generation, &[(t[0].clone(), p, 5)], &topics),
            CommandResponse::Rejected { code: ErrorCode::IllegalGeneration, .. }
        ));
        let (d_p, _) = (g.members["d"].assigned.iter().next().unwrap().1, ());
        assert!(matches!(
            g.commit("d", g.generation, &[(t[0].clone(), d_p, 101)], &topics),
            CommandResponse::Rejected { code: ErrorCode::OffsetOutOfRange, .. }
        ));
        // Reset needs an inactive group.
        assert!(matches!(
            g.reset(&t[0], OffsetReset::Earliest, &topics),
            CommandResponse::Rejected { code: ErrorCode::NonEmptyGroup, .. }
        ));
        for m in ["a", "b", "c", "d"] {
            g.leave(m, &topics);
        }
        g.reset(&t[0], OffsetReset::Latest, &topics);
        assert!(g.committed.values().all(|o| *o == 100));
    }
}
