//! Raising the cluster's apply version (`busbar_storage::apply_version`), decided by the leader.
//!
//! Every `CHECK_EVERY`, the leader compares the version its state machine applies with the highest
//! its build knows. If the cluster is behind, it asks every member (voters and learners) for its own
//! status and proposes `SetApplyVersion` only when each one answers with a build that knows the new
//! version. A node checks only once it has led for a whole `CHECK_EVERY` (it saw itself leader at
//! the check before), not at its first check after an election: a new leader gives the members it
//! just heard from a moment to show up, and the raise is never a race with the cluster's forming.
//! A member that is down or runs an older build holds the change back (logged, retried):
//! an entry it could not apply the same way must not reach the log.

use std::time::Duration;

use busbar_proto::v1 as pb;
use busbar_raft::RaftNode;
use busbar_storage::apply_version::APPLY_VERSION;
use busbar_types::{Command, CommandResponse, NodeId};
use openraft::ServerState;

use crate::cluster::probe;
use crate::propose::Proposer;

const CHECK_EVERY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run(node: RaftNode, proposer: Proposer, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut held_back_by: Option<String> = None;
    // The term in which this node was leader at the previous check.
    let mut led_in: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
        let m = node.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            led_in = None;
            continue;
        }
        if led_in.replace(m.current_term) != Some(m.current_term) {
            continue;
        }
        let current = match node.store.apply_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "apply version: cannot read the store's");
                continue;
            }
        };
        if current >= APPLY_VERSION {
            return;
        }
        let members: Vec<(NodeId, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        // Concurrently: one round takes one probe timeout at most, however many members.
        let calls: Vec<_> = members
            .into_iter()
            .map(|(id, addr)| tokio::spawn(async move { (id, probe(&addr, PROBE_TIMEOUT).await) }))
            .collect();
        let mut answers = Vec::with_capacity(calls.len());
        for call in calls {
            match call.await {
                Ok(answer) => answers.push(answer),
                Err(e) => answers.push((0, Err(format!("probe task failed: {e}")))),
            }
        }
        match blocker(APPLY_VERSION, &answers) {
            Some(why) => {
                if held_back_by.as_deref() != Some(why.as_str()) {
                    tracing::info!(from = current, to = APPLY_VERSION, %why, "apply version: not raised yet");
                    held_back_by = Some(why);
                }
            }
            None => match proposer.write(Command::SetApplyVersion { version: APPLY_VERSION }).await {
                Ok(CommandResponse::ApplyVersionSet { version }) => {
                    tracing::info!(from = current, to = version, "apply version raised for the cluster");
                }
                Ok(other) => tracing::warn!(?other, "apply version: unexpected answer; will retry"),
                Err(st) => tracing::info!(status = %st, "apply version: proposal failed; will retry"),
            },
        }
    }
}

/// Why the cluster cannot move to `version` yet, given each other member's status (or why it did
/// not answer); `None` when every member's build knows `version`.
fn blocker(version: u32, answers: &[(NodeId, Result<pb::NodeStatus, String>)]) -> Option<String> {
    answers.iter().find_map(|(id, answer)| match answer {
        Err(e) => Some(format!("node {id} did not answer: {e}")),
        Ok(st) if st.max_apply_version < version => Some(format!(
            "node {id} runs a build that applies up to version {} (0: before versions); upgrade it",
            st.max_apply_version
        )),
        Ok(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(max_apply_version: u32) -> Result<pb::NodeStatus, String> {
        Ok(pb::NodeStatus { max_apply_version, ..Default::default() })
    }

    #[test]
    fn every_member_must_answer_with_a_build_that_knows_the_version() {
        assert_eq!(blocker(2, &[]), None, "a single node needs no one");
        assert_eq!(blocker(2, &[(2, status(2)), (3, status(3))]), None);
        let old = blocker(2, &[(2, status(2)), (3, status(0))]).unwrap_or_default();
        assert!(old.contains("node 3") && old.contains("upgrade"), "{old}");
        let down = blocker(2, &[(2, Err("connection refused".into())), (3, status(2))]).unwrap_or_default();
        assert!(down.contains("node 2 did not answer"), "{down}");
    }
}
