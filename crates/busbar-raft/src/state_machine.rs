//! openraft's state machine over the sled topic store; its snapshots are in [`crate::snapshot`].
//!
//! Durability: the applied position (last log id + membership) is written by the store in the same
//! sled transaction as the data.

use busbar_storage::TopicStore;
use busbar_types::{Command, CommandResponse};
use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use crate::apply_watchdog::ApplyWatchdog;
use crate::codec;
use crate::snapshot::{self, decode_applied, AppliedState, SnapshotData, SnapshotDir};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, TypeConfig};

pub struct StateMachine {
    store: TopicStore,
    snapshots: SnapshotDir,
    /// Publishes the last applied index, so long polls and subscriptions wake when data commits.
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// Last membership applied; kept here because membership entries carry no command.
    membership: StoredMembership,
    last_applied: Option<LogId>,
    /// Marks each apply, so a store that stops making progress fails the node (see `apply_watchdog`).
    watchdog: Option<ApplyWatchdog>,
}

impl StateMachine {
    /// Opens the state machine over `store`, pinning (or retaking) its current snapshot.
    pub fn open(store: TopicStore, snapshots: SnapshotDir) -> Result<Self, StorageError> {
        snapshot::reopen(&store, &snapshots).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let applied = decode_applied(store.applied().map_err(|e| StorageIOError::read_state_machine(&e))?.as_ref())?;
        let (applied_tx, _) = tokio::sync::watch::channel(applied.last_applied.map(|l| l.index).unwrap_or(0));
        Ok(Self {
            store,
            snapshots,
            applied_tx,
            membership: applied.membership,
            last_applied: applied.last_applied,
            watchdog: None,
        })
    }

    /// Applies are watched by `watchdog` from now on.
    pub fn with_watchdog(mut self, watchdog: ApplyWatchdog) -> Self {
        self.watchdog = Some(watchdog);
        self
    }

    /// Changes whenever entries are applied or a snapshot is installed; holds the last applied index.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    pub fn store(&self) -> &TopicStore {
        &self.store
    }

    pub fn snapshot_dir(&self) -> &SnapshotDir {
        &self.snapshots
    }
}

pub struct SnapshotBuilder {
    store: TopicStore,
    snapshots: SnapshotDir,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let built = tokio::task::spawn_blocking(move || snapshot::build(&store, &snapshots))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        built.map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else { return Ok(Vec::new()) };
        let mut membership = self.membership.clone();
        let mut commands: Vec<Option<&Command>> = Vec::with_capacity(entries.len());
        for e in &entries {
            match &e.payload {
                EntryPayload::Blank => commands.push(None),
                EntryPayload::Normal(cmd) => commands.push(Some(cmd)),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(e.log_id), m.clone());
                    commands.push(None);
                }
            }
        }
        let applied = AppliedState { last_applied: Some(last), membership: membership.clone() };
        let applied_bytes = codec::encode("applied state", &applied).map_err(|e| StorageIOError::apply(last, &e))?;
        let busy = self.watchdog.as_ref().map(ApplyWatchdog::begin);
        let responses =
            self.store.apply(&commands, Bytes::from(applied_bytes)).map_err(|e| StorageIOError::apply(last, &e))?;
        drop(busy);
        self.membership = membership;
        self.last_applied = Some(last);
        self.applied_tx.send_replace(last.index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.store.clone(), snapshots: self.snapshots.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::Received { path: self.snapshots.incoming_path() }))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Box<SnapshotData>) -> Result<(), StorageError> {
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let meta_c = meta.clone();
        let sig = meta.signature();
        let installed = tokio::task::spawn_blocking(move || snapshot::install(&store, &snapshots, &meta_c, *data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), &e))?;
        let applied: AppliedState =
            installed.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.membership = applied.membership;
        self.last_applied = applied.last_applied;
        self.applied_tx.send_replace(self.last_applied.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        snapshot::current(&self.store, &self.snapshots).map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}
