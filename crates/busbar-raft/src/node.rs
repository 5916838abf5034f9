//! Opening a node's Raft state: the WAL, the topic store, the snapshot directory and openraft.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use busbar_storage::wal::{Wal, WalOptions};
use busbar_storage::{StoreError, TopicStore, TopicStoreOptions};
use busbar_types::NodeId;
use openraft::{Config, SnapshotPolicy};

use crate::apply_watchdog::{ApplyWatchdog, APPLY_STALL_LIMIT};
use crate::log_store::LogStore;
use crate::network::{NetworkFactory, Partitions};
use crate::snapshot::SnapshotDir;
use crate::state_machine::StateMachine;
use crate::types::Raft;

/// Raft timing and log-compaction settings. The defaults hold on a loaded 2-core machine and in
/// containers, where openraft's own (50 ms heartbeat, 150–300 ms election) cause needless elections.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries applied since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log below a snapshot, so a slightly lagging follower catches up by log.
    pub logs_to_keep: u64,
    /// Most entries in one AppendEntries message (each entry is at most one produce batch).
    pub max_entries_per_append: u64,
    pub wal_segment_bytes: u64,
    /// sled's cache (see `TopicStoreOptions::cache_bytes`; `--store-cache-mib`).
    pub sled_cache_bytes: u64,
    /// Size at which a batch file is closed (`TopicStoreOptions::batch_file_bytes`; tests use
    /// small files).
    pub batch_file_bytes: u64,
    /// How often the reclaimer looks for sparse batch files to compact (`TopicStore::compact`).
    pub compact_every_ms: u64,
    /// Test hook: links cut between in-process nodes. `None` in production.
    pub partitions: Option<Partitions>,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            // Snapshots are manifests (no data copied), so they can be frequent: the WAL stays
            // small and each purge unlinks little (docs/benchmarks.md, the long run).
            snapshot_every: 2_000,
            logs_to_keep: 5_000,
            max_entries_per_append: 64,
            wal_segment_bytes: 64 << 20,
            sled_cache_bytes: TopicStoreOptions::DEFAULT_CACHE_BYTES,
            batch_file_bytes: busbar_storage::batch_files::FILE_BYTES,
            compact_every_ms: 10_000,
            partitions: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("raft log: {0}")]
    Wal(#[from] busbar_storage::wal::WalError),
    #[error("state machine: {0}")]
    Store(#[from] StoreError),
    #[error("state machine: {0}")]
    StateMachine(#[from] openraft::StorageError<NodeId>),
    #[error("invalid raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Fatal(#[from] openraft::error::Fatal<NodeId>),
    #[error("starting the apply watchdog thread: {0}")]
    Watchdog(std::io::Error),
    #[error("raft log: {0}")]
    Codec(#[from] crate::codec::CodecError),
    /// The log is purged up to a snapshot the store has made durable, or, in openraft 0.9, as soon
    /// as a snapshot received from the leader is queued for install. A store behind that point lost
    /// data it had, or the process stopped during that install; either way the entries in between
    /// are gone (openraft could not re-apply them and would stop).
    #[error(
        "the state machine (state/) has applied the log up to index {applied}, but the log (raft-log/) \
         was purged up to index {purged}: the entries in between are gone. Either state/ lost data it had \
         made durable (damaged, truncated or restored from an older copy) or the process stopped while \
         installing a snapshot from the leader. This node cannot recover by itself: remove it from the \
         cluster, wipe its data directory and add it back"
    )]
    StoreBehindLog { applied: u64, purged: u64 },
}

/// A node that was leader when it stopped starts as a follower of its own term: its stored vote,
/// committed for itself, is stored again uncommitted. openraft 0.9 would otherwise resume leading at
/// once (`Engine::startup`) with whatever log it holds now; if that log lost entries the others hold
/// (a WAL cut within the synced mark's last period), its new entries would reuse their indexes in
/// the same term and the logs would diverge. As a follower it must win an election in a new term,
/// which a log missing committed entries cannot. The cost is that election on a leader's restart,
/// which the operations guide already counts ("Restarting the leader costs an election").
fn step_down_stored_leadership(wal: &Wal, id: NodeId) -> Result<(), NodeError> {
    let Some(bytes) = wal.vote() else { return Ok(()) };
    let vote: crate::types::Vote = crate::codec::decode("vote", &bytes)?;
    if !vote.is_committed() || vote.leader_id().voted_for() != Some(id) {
        return Ok(());
    }
    let term = vote.leader_id().get_term();
    let follower = crate::types::Vote::new(term, id);
    wal.save_vote(bytes::Bytes::from(crate::codec::encode("vote", &follower)?))?;
    tracing::info!(term, "was leader when it stopped: starts as a follower of that term, an election decides");
    Ok(())
}

/// A node's replication state, open and running.
#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    pub store: TopicStore,
    pub wal: Wal,
    pub snapshots: SnapshotDir,
    /// The last applied index; changes when data commits (long polls and subscriptions wait on it).
    pub applied: tokio::sync::watch::Receiver<u64>,
    /// `RaftConfig::compact_every_ms`.
    compact_every: Duration,
}

/// Live batch bytes one compaction round copies at most (it copies at least one file's): bounds how
/// long it holds off reclaim and snapshot exports.
const COMPACT_MAX_MOVE_BYTES: u64 = 256 << 20;

impl RaftNode {
    /// Opens (recovering) the node's storage under `data_dir` and starts openraft. A corrupt WAL or
    /// store makes this fail with an error naming the file: the node must not start.
    pub async fn open(id: NodeId, data_dir: &Path, cfg: &RaftConfig) -> Result<Self, NodeError> {
        // sled locks its files exclusively: opening it first makes a second process on the same
        // data dir fail here, before it could run WAL recovery under a live node.
        let store = TopicStore::open(
            &data_dir.join("state"),
            &TopicStoreOptions {
                cache_bytes: cfg.sled_cache_bytes,
                batch_file_bytes: cfg.batch_file_bytes,
                ..Default::default()
            },
        )?;
        let wal = Wal::open(
            &data_dir.join("raft-log"),
            WalOptions { segment_bytes: cfg.wal_segment_bytes, ..WalOptions::default() },
        )?;
        step_down_stored_leadership(&wal, id)?;
        let snapshots = SnapshotDir::open(&data_dir.join("snapshots"))?;
        let watchdog =
            ApplyWatchdog::start(APPLY_STALL_LIMIT, ApplyWatchdog::abort_process()).map_err(NodeError::Watchdog)?;
        let sm = StateMachine::open(store.clone(), snapshots.clone())?.with_watchdog(watchdog);
        let applied = sm.subscribe_applied();
        if let Some((purged, _)) = wal.purged() {
            let applied = *applied.borrow();
            if applied < purged {
                return Err(NodeError::StoreBehindLog { applied, purged });
            }
        }
        let config = Config {
            cluster_name: "busbar".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.logs_to_keep,
            max_payload_entries: cfg.max_entries_per_append,
            // Snapshots go through `full_snapshot` (streamed by our transport, with its own
            // deadline); this only bounds openraft's own waits on it.
            install_snapshot_timeout: 60_000,
            ..Config::default()
        }
        .validate()?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            NetworkFactory::new(id, cfg.partitions.clone()),
            LogStore::new(wal.clone()),
            sm,
        )
        .await?;
        Ok(Self {
            id,
            raft,
            store,
            wal,
            snapshots,
            applied,
            compact_every: Duration::from_millis(cfg.compact_every_ms),
        })
    }

    /// Deletes unreachable data (deleted topics, replaced generations) in bounded steps, and once
    /// that is done compacts sparse batch files every `compact_every`, until `shutdown` resolves.
    /// Spawn it next to the node.
    pub async fn run_reclaimer(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut next_compaction = tokio::time::Instant::now() + self.compact_every;
        loop {
            let store = self.store.clone();
            let res = tokio::task::spawn_blocking(move || store.reclaim(10_000)).await;
            let mut busy = matches!(res, Ok(Ok(n)) if n > 0);
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "reclaiming deleted data failed; will retry");
            }
            if !busy && tokio::time::Instant::now() >= next_compaction {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.compact(COMPACT_MAX_MOVE_BYTES)).await {
                    Ok(Ok(s)) if s.batches > 0 => {
                        tracing::info!(
                            files = s.files,
                            freed_bytes = s.freed_bytes,
                            batches = s.batches,
                            moved_bytes = s.moved_bytes,
                            "compacted sparse batch files"
                        );
                        // More may be waiting: the next round soon, after another reclaim turn.
                        busy = true;
                    }
                    Ok(Ok(s)) if s.more => {
                        // A stretch of a large store's references held nothing to move: the next
                        // one in a second, so a long scan takes about half a core, not all of one.
                        next_compaction = tokio::time::Instant::now() + self.compact_every.min(Duration::from_secs(1));
                    }
                    Ok(Ok(_)) => next_compaction = tokio::time::Instant::now() + self.compact_every,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "compacting batch files failed; will retry");
                        next_compaction = tokio::time::Instant::now() + self.compact_every;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the compaction task ended abnormally; will retry");
                        next_compaction = tokio::time::Instant::now() + self.compact_every;
                    }
                }
            }
            let pause = if busy { Duration::from_millis(10) } else { Duration::from_millis(500) };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Stops openraft, then makes the state machine and the log durable.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        let store = self.store.clone();
        let wal = self.wal.clone();
        let res = tokio::task::spawn_blocking(move || (store.flush_durable(), wal.close())).await;
        match res {
            Ok((Ok(()), Ok(()))) => {}
            Ok((a, b)) => tracing::warn!(store = ?a.err(), wal = ?b.err(), "flush at shutdown failed"),
            Err(e) => tracing::warn!(error = %e, "flush at shutdown panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::Vote;

    fn stored(wal: &Wal) -> Vote {
        crate::codec::decode("vote", &wal.vote().unwrap()).unwrap()
    }

    #[test]
    fn only_a_committed_vote_for_this_node_is_stepped_down_and_in_its_own_term() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        step_down_stored_leadership(&wal, 1).unwrap();
        assert!(wal.vote().is_none(), "no vote: nothing to do");
        for (vote, want) in [
            (Vote::new_committed(7, 1), Vote::new(7, 1)),
            (Vote::new_committed(7, 2), Vote::new_committed(7, 2)),
            (Vote::new(8, 1), Vote::new(8, 1)),
        ] {
            wal.save_vote(bytes::Bytes::from(crate::codec::encode("vote", &vote).unwrap())).unwrap();
            step_down_stored_leadership(&wal, 1).unwrap();
            assert_eq!(stored(&wal), want, "from {vote:?}");
        }
    }
}
