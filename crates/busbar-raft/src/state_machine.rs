//! openraft's state machine over the sled topic store, with snapshots as files.
//!
//! A snapshot at index X is the topic store's metadata at X plus every batch below each partition's
//! end offset at X, streamed by the store into a file (see `busbar_storage::snapshot_file`) while
//! appends go on. The file, not memory, is what openraft hands around ([`SnapshotFile`]), what the
//! network streams in chunks, and what an install reads from.
//!
//! Durability: the applied position (last log id + membership) is written by the store in the same
//! sled transaction as the data. Before a snapshot is handed to openraft — after which openraft may
//! purge the Raft log up to it — the store is made durable (`flush_durable`), so the log is never
//! purged below what sled holds on disk.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use busbar_storage::{checked, durable, StoreError, TopicStore};
use busbar_types::{Command, CommandResponse};
use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::apply_watchdog::ApplyWatchdog;
use crate::codec;
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, TypeConfig};

/// A snapshot as openraft sees it: a file. Cloning copies the path, not the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// What the state machine stores as its applied position (opaque bytes to the storage crate).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

fn decode_applied(bytes: Option<&Bytes>) -> Result<AppliedState, StorageError> {
    match bytes {
        None => Ok(AppliedState::default()),
        Some(b) => Ok(codec::decode("applied state", b).map_err(|e| StorageIOError::read_state_machine(&e))?),
    }
}

/// Where snapshots live: `<dir>/<snapshot id>.snap` files, `current.meta` naming the newest built or
/// installed one, and `incoming-*` files being received from a leader.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
    nonce: Arc<AtomicU64>,
}

const CURRENT_META: &str = "current.meta";

impl SnapshotDir {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        // Files of an interrupted build or transfer are garbage: nothing refers to them.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".tmp") || name.starts_with("incoming-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Self { dir: dir.to_path_buf(), nonce: Arc::new(AtomicU64::new(seed)) })
    }

    fn next_nonce(&self) -> u64 {
        self.nonce.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh path for a snapshot being received.
    pub fn incoming_path(&self) -> PathBuf {
        self.dir.join(format!("incoming-{}", self.next_nonce()))
    }

    fn current(&self) -> Result<Option<(SnapshotMeta, PathBuf)>, StoreError> {
        let path = self.dir.join(CURRENT_META);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        let meta: SnapshotMeta = checked::open_bincode(&|| path.display().to_string(), &bytes)?;
        let file = self.dir.join(format!("{}.snap", meta.snapshot_id));
        Ok(Some((meta, file)))
    }

    /// Makes `file` (already fsynced, inside this dir) the current snapshot, durably, and deletes
    /// older snapshot files except the previous one (a transfer of it may still be under way).
    fn publish(&self, meta: &SnapshotMeta, file: &Path) -> Result<PathBuf, StoreError> {
        let target = self.dir.join(format!("{}.snap", meta.snapshot_id));
        std::fs::rename(file, &target).map_err(|e| StoreError::io(format!("rename to {}", target.display()), e))?;
        let previous = self.current()?.map(|(m, _)| m.snapshot_id);
        let tmp = self.dir.join(format!("{CURRENT_META}.tmp"));
        let sealed = checked::seal_bincode("snapshot meta", meta)?;
        write_synced(&tmp, &sealed)?;
        std::fs::rename(&tmp, self.dir.join(CURRENT_META)).map_err(|e| StoreError::io("rename current.meta", e))?;
        durable::fsync_path(&self.dir)?;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(id) = name.strip_suffix(".snap") else { continue };
                if id != meta.snapshot_id && Some(id) != previous.as_deref() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(target)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = std::fs::File::create(path).map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
    f.write_all(bytes).map_err(|e| StoreError::io(format!("write {}", path.display()), e))?;
    f.sync_all().map_err(|e| StoreError::io(format!("fsync {}", path.display()), e))
}

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
    pub fn open(store: TopicStore, snapshots: SnapshotDir) -> Result<Self, StorageError> {
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
        let built = tokio::task::spawn_blocking(move || build_snapshot_file(&store, &snapshots))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        built.map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }
}

fn build_snapshot_file(store: &TopicStore, snapshots: &SnapshotDir) -> Result<Snapshot, StoreError> {
    let tmp = snapshots.dir.join(format!("build-{}.tmp", snapshots.next_nonce()));
    let file = std::fs::File::create(&tmp).map_err(|e| StoreError::io(format!("create {}", tmp.display()), e))?;
    let (summary, writer) = store.export_snapshot(BufWriter::with_capacity(1 << 20, file))?;
    let file = writer.into_inner().map_err(|e| StoreError::io("flush snapshot", e.into_error()))?;
    file.sync_all().map_err(|e| StoreError::io(format!("fsync {}", tmp.display()), e))?;
    // Everything applied so far (at least up to the snapshot's index) becomes durable before
    // openraft learns of the snapshot and may purge the log below it.
    store.flush_durable()?;
    let applied =
        decode_applied(summary.applied.as_ref()).map_err(|e| StoreError::corrupt("applied state", e.to_string()))?;
    let id = match &applied.last_applied {
        Some(l) => format!("{}-{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index, snapshots.next_nonce()),
        None => format!("0-0-0-{}", snapshots.next_nonce()),
    };
    let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership, snapshot_id: id };
    let path = snapshots.publish(&meta, &tmp)?;
    tracing::info!(snapshot = %meta.snapshot_id, batches = summary.batches, bytes = summary.bytes, "built snapshot");
    Ok(Snapshot { meta, snapshot: Box::new(SnapshotFile { path }) })
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        Ok(Box::new(SnapshotFile { path: self.snapshots.incoming_path() }))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageError> {
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let meta_c = meta.clone();
        let sig = meta.signature();
        let src = snapshot.path.clone();
        let installed = tokio::task::spawn_blocking(move || install_snapshot_file(&store, &snapshots, &meta_c, &src))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), &e))?;
        let applied = installed.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.membership = applied.membership;
        self.last_applied = applied.last_applied;
        self.applied_tx.send_replace(self.last_applied.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.snapshots.current().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, path)| Snapshot { meta, snapshot: Box::new(SnapshotFile { path }) }))
    }
}

fn install_snapshot_file(
    store: &TopicStore,
    snapshots: &SnapshotDir,
    meta: &SnapshotMeta,
    src: &Path,
) -> Result<AppliedState, StoreError> {
    let file = std::fs::File::open(src).map_err(|e| StoreError::io(format!("open snapshot {}", src.display()), e))?;
    let applied_bytes = store.import_snapshot(BufReader::with_capacity(1 << 20, file), &src.display().to_string())?;
    let applied =
        decode_applied(applied_bytes.as_ref()).map_err(|e| StoreError::corrupt("applied state", e.to_string()))?;
    if applied.last_applied != meta.last_log_id {
        return Err(StoreError::CorruptSnapshot {
            path: src.to_path_buf(),
            reason: format!("its data is at {:?} but its metadata says {:?}", applied.last_applied, meta.last_log_id),
        });
    }
    // Keep the installed snapshot as our current one, so we can serve it on in turn. A file we
    // received is moved; one from elsewhere (the conformance suite hands another store's file) is
    // copied.
    let tmp = snapshots.dir.join(format!("install-{}.tmp", snapshots.next_nonce()));
    if src.parent() == Some(snapshots.dir.as_path()) {
        std::fs::rename(src, &tmp).map_err(|e| StoreError::io("move received snapshot", e))?;
    } else {
        std::fs::copy(src, &tmp).map_err(|e| StoreError::io("copy snapshot", e))?;
    }
    durable::fsync_path(&tmp)?;
    snapshots.publish(meta, &tmp)?;
    tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
    Ok(applied)
}
