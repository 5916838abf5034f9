//! Retention, decided by the leader and carried out through the log.
//!
//! Every `retention_check`, the leader looks at each partition of each topic with `retention.ms` or
//! `retention.bytes` in effect, finds the first whole batch to keep (by the newest timestamp in each
//! batch against the leader's clock, and by bytes), and proposes `TruncatePrefix` up to it. Every
//! node applies that command at the same point of the log, so every node drops exactly the same
//! records, whatever its own clock says. The batches themselves are deleted later, in bounded steps,
//! by the state machine's reclaimer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use busbar_raft::RaftNode;
use busbar_types::{Command, TopicConfig};
use openraft::ServerState;

use crate::propose::Proposer;

/// Proposals per round at most: a round never floods the log, the next one continues.
const MAX_PROPOSALS_PER_ROUND: usize = 1_000;

pub async fn run(
    node: RaftNode,
    proposer: Proposer,
    defaults: TopicConfig,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if node.raft.metrics().borrow().state != ServerState::Leader {
            continue;
        }
        if let Err(e) = round(&node, &proposer, &defaults).await {
            tracing::warn!(error = %e, "retention round failed; will retry");
        }
    }
}

async fn round(node: &RaftNode, proposer: &Proposer, defaults: &TopicConfig) -> Result<(), String> {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let topics = node.store.list_topics().map_err(|e| e.to_string())?;
    let mut proposed = 0;
    for t in topics {
        let cfg = t.config.or(defaults);
        let (by_time, by_bytes) = (cfg.retention_ms(), cfg.retention_bytes());
        if by_time.is_none() && by_bytes.is_none() {
            continue;
        }
        for p in 0..t.partitions {
            let store = node.store.clone();
            let name = t.name.to_string();
            let point = tokio::task::spawn_blocking(move || store.retention_point(&name, p, now_ms, by_time, by_bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let Some(new_start) = point else { continue };
            let cmd = Command::TruncatePrefix { topic: t.name.clone(), topic_id: t.id, partition: p, new_start };
            match proposer.write(cmd).await {
                Ok(_) => tracing::debug!(topic = %t.name, partition = p, new_start, "retention dropped a prefix"),
                // Not leader any more, or the topic went away: the next round decides afresh.
                Err(st) => tracing::debug!(topic = %t.name, partition = p, status = %st, "retention proposal failed"),
            }
            proposed += 1;
            if proposed >= MAX_PROPOSALS_PER_ROUND {
                return Ok(());
            }
        }
    }
    Ok(())
}
