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
}

impl RaftNode {
    /// Opens (recovering) the node's storage under `data_dir` and starts openraft. A corrupt WAL or
    /// store makes this fail with an error naming the file: the node must not start.
    pub async fn open(id: NodeId, data_dir: &Path, cfg: &RaftConfig) -> Result<Self, NodeError> {
        // sled locks its files exclusively: opening it first makes a second process on the same
        // data dir fail here, before it could run WAL recovery under a live node.
        let store = TopicStore::open(
            &data_dir.join("state"),
            &TopicStoreOptions { cache_bytes: cfg.sled_cache_bytes, ..Default::default() },
        )?;
        let wal = Wal::open(
            &data_dir.join("raft-log"),
            WalOptions { segment_bytes: cfg.wal_segment_bytes, ..WalOptions::default() },
        )?;
        let snapshots = SnapshotDir::open(&data_dir.join("snapshots"))?;
        let watchdog =
            ApplyWatchdog::start(APPLY_STALL_LIMIT, ApplyWatchdog::abort_process()).map_err(NodeError::Watchdog)?;
        let sm = StateMachine::open(store.clone(), snapshots.clone())?.with_watchdog(watchdog);
        let applied = sm.subscribe_applied();
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
        Ok(Self { id, raft, store, wal, snapshots, applied })
    }

    /// Deletes unreachable data (deleted topics, replaced generations) in bounded steps until
    /// `shutdown` resolves. Spawn it next to the node.
    pub async fn run_reclaimer(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let store = self.store.clone();
            let res = tokio::task::spawn_blocking(move || store.reclaim(10_000)).await;
            let busy = matches!(res, Ok(Ok(n)) if n > 0);
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "reclaiming deleted data failed; will retry");
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
