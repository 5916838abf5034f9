//! Raft snapshots of the topic store: held as manifests, streamed from the store on demand.
//!
//! A snapshot at index X is the store's metadata at X plus every batch below each partition's end
//! offset at X. The batches are already in the store, so a node keeps its snapshot as a
//! [`SnapshotManifest`] (a few kilobytes, in `<data>/snapshots/current.snapshot`) and the store keeps
//! the batches it names (see `busbar_storage::snapshot_manifest`). Only when a follower needs the
//! snapshot does the leader read the batches, streaming them from the store to the network
//! (`network::full_snapshot`); the follower writes the stream to a file, installs it into a fresh
//! generation of its store, and deletes the file.
//!
//! Durability: building a snapshot makes the store durable (`flush_durable`) before openraft learns
//! of it and may purge the log up to it, so the log is never purged below what sled holds on disk.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use busbar_storage::{checked, durable, SnapshotManifest, StoreError, TopicStore};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::types::{LogId, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};

/// A snapshot as openraft hands it around.
pub enum SnapshotData {
    /// One this node holds: a manifest naming batches in its own store, read from the store only
    /// when the snapshot is sent.
    Held { manifest: Arc<SnapshotManifest>, store: TopicStore },
    /// A snapshot stream in a file, as a leader sent it: what a follower installs.
    Received { path: PathBuf },
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Held { manifest, .. } => {
                f.debug_struct("Held").field("batch_bytes", &manifest.batch_bytes()).finish_non_exhaustive()
            }
            SnapshotData::Received { path } => f.debug_struct("Received").field("path", path).finish(),
        }
    }
}

/// What the state machine stores as its applied position (opaque bytes to the storage crate).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

pub(crate) fn decode_applied(bytes: Option<&Bytes>) -> Result<AppliedState, StorageError> {
    match bytes {
        None => Ok(AppliedState::default()),
        Some(b) => Ok(codec::decode("applied state", b).map_err(|e| StorageIOError::read_state_machine(&e))?),
    }
}

fn applied_of(manifest: &SnapshotManifest) -> Result<AppliedState, StoreError> {
    decode_applied(manifest.applied().as_ref()).map_err(|e| StoreError::corrupt("applied state", e.to_string()))
}

/// Where a node's snapshot lives: `current.snapshot` (the newest built or installed snapshot's
/// metadata and manifest, crc-sealed) and `incoming-*` streams being received from a leader.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
    nonce: Arc<AtomicU64>,
    /// A build and an install may finish at once (openraft runs builds beside the state machine):
    /// one publish at a time, and never an older snapshot over a newer one.
    publishing: Arc<Mutex<()>>,
}

const CURRENT: &str = "current.snapshot";

impl SnapshotDir {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        // Files of an interrupted build or transfer are garbage: nothing refers to them. So are the
        // full-copy snapshot files (`*.snap`, `current.meta`) of releases before manifests.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let legacy = name.ends_with(".snap") || name == "current.meta";
                if name.ends_with(".tmp") || name.starts_with("incoming-") || legacy {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Self { dir: dir.to_path_buf(), nonce: Arc::new(AtomicU64::new(seed)), publishing: Arc::default() })
    }

    fn next_nonce(&self) -> u64 {
        self.nonce.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh path for a snapshot stream being received.
    pub fn incoming_path(&self) -> PathBuf {
        self.dir.join(format!("incoming-{}", self.next_nonce()))
    }

    pub(crate) fn current(&self) -> Result<Option<(SnapshotMeta, SnapshotManifest)>, StoreError> {
        let path = self.dir.join(CURRENT);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        };
        Ok(Some(checked::open_bincode(&|| path.display().to_string(), &bytes)?))
    }

    /// Makes `manifest` the current snapshot, durably (write, fsync, rename, fsync the directory),
    /// unless the current one is newer (an install that finished while a build ran): returns whether
    /// it did.
    fn publish(&self, meta: &SnapshotMeta, manifest: &SnapshotManifest) -> Result<bool, StoreError> {
        let _one = self.publishing.lock().map_err(|_| StoreError::corrupt("snapshot dir lock", "poisoned"))?;
        if let Ok(Some((current, _))) = self.current() {
            if current.last_log_id > meta.last_log_id {
                return Ok(false);
            }
        }
        let tmp = self.dir.join(format!("{CURRENT}.{}.tmp", self.next_nonce()));
        let sealed = checked::seal_bincode("snapshot manifest", &(meta, manifest))?;
        write_synced(&tmp, &sealed)?;
        std::fs::rename(&tmp, self.dir.join(CURRENT)).map_err(|e| StoreError::io(format!("rename {CURRENT}"), e))?;
        durable::fsync_path(&self.dir)?;
        Ok(true)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = std::fs::File::create(path).map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
    f.write_all(bytes).map_err(|e| StoreError::io(format!("write {}", path.display()), e))?;
    f.sync_all().map_err(|e| StoreError::io(format!("fsync {}", path.display()), e))
}

fn held(meta: SnapshotMeta, manifest: SnapshotManifest, store: &TopicStore) -> Snapshot {
    Snapshot { meta, snapshot: Box::new(SnapshotData::Held { manifest: Arc::new(manifest), store: store.clone() }) }
}

/// Takes a snapshot of everything applied so far: captures (and pins) a manifest, makes the store
/// durable, then publishes it. Reads no batch.
pub(crate) fn build(store: &TopicStore, snapshots: &SnapshotDir) -> Result<Snapshot, StoreError> {
    let manifest = store.capture_snapshot()?;
    // Everything applied so far (at least up to the snapshot's index) becomes durable before
    // openraft learns of the snapshot and may purge the log below it.
    store.flush_durable()?;
    let applied = applied_of(&manifest)?;
    let id = match &applied.last_applied {
        Some(l) => format!("{}-{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index, snapshots.next_nonce()),
        None => format!("0-0-0-{}", snapshots.next_nonce()),
    };
    let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership, snapshot_id: id };
    if snapshots.publish(&meta, &manifest)? {
        // Only now may reclaim drop what the previous snapshot named. An install may have replaced
        // the store since the publish; then its own manifest is pinned and this one is refused.
        if let Err(e) = store.pin_snapshot(&manifest) {
            tracing::info!(error = %e, "a snapshot installed meanwhile replaces the one just built");
        }
        tracing::info!(snapshot = %meta.snapshot_id, batch_bytes = manifest.batch_bytes(), "built snapshot");
    } else {
        tracing::info!(snapshot = %meta.snapshot_id, "built snapshot not published: a newer one was installed meanwhile");
    }
    Ok(held(meta, manifest, store))
}

/// The node's current snapshot, pinned in its store. Run once when a node opens. The manifest is
/// derived data — the store holds everything it names — so one that cannot be used is replaced by a
/// fresh snapshot of the store: one whose generation the store no longer has (a crash between
/// installing a snapshot and publishing its manifest), a damaged one (reported, never used), or none
/// after a release that kept full copies.
pub(crate) fn reopen(store: &TopicStore, snapshots: &SnapshotDir) -> Result<(), StoreError> {
    if let Some(reason) = store.lost_data()? {
        return roll_back(store, snapshots, &reason);
    }
    let retake = match snapshots.current() {
        Ok(Some((_, manifest))) => match store.pin_snapshot(&manifest) {
            Ok(()) => return Ok(()),
            Err(StoreError::SnapshotUnavailable(reason)) => {
                tracing::warn!(%reason, "the current snapshot's data is gone; taking a new snapshot");
                true
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::error!(error = %e, "the current snapshot's manifest is damaged; taking a new snapshot");
                true
            }
            Err(e) => return Err(e),
        },
        Err(e @ StoreError::Corrupt { .. }) => {
            tracing::error!(error = %e, "the current snapshot's manifest is damaged; taking a new snapshot");
            true
        }
        Err(e) => return Err(e),
        // Applied state but no snapshot: either none was due yet, or the node ran a release whose
        // snapshot files `SnapshotDir::open` just deleted; then the log may be purged below the
        // store, and a snapshot must exist. Taking one is cheap.
        Ok(None) => store.applied()?.is_some(),
    };
    if retake {
        build(store, snapshots)?;
    }
    Ok(())
}

/// The store references batch bytes that never reached the disk (a power loss: sled flushes on its
/// own, the batch files only when a snapshot is built). Its published snapshot was made durable
/// before it was published, and the log holds every entry after it: the store goes back to the
/// snapshot and openraft replays the rest. Without a usable snapshot the node does not start.
fn roll_back(store: &TopicStore, snapshots: &SnapshotDir, reason: &str) -> Result<(), StoreError> {
    match snapshots.current()? {
        Some((meta, manifest)) => {
            tracing::error!(%reason, snapshot = %meta.snapshot_id, "the store is ahead of its data; rolling it back to its snapshot");
            store.pin_snapshot(&manifest)?;
            if let Some(rebuilt) = store.rebuild_from(Some(&manifest))? {
                snapshots.publish(&meta, &rebuilt)?;
            }
        }
        None => {
            tracing::error!(%reason, "the store is ahead of its data and has no snapshot; emptying it, the log replays from its start");
            store.rebuild_from(None)?;
        }
    }
    Ok(())
}

pub(crate) fn current(store: &TopicStore, snapshots: &SnapshotDir) -> Result<Option<Snapshot>, StoreError> {
    Ok(snapshots.current()?.map(|(meta, manifest)| held(meta, manifest, store)))
}

/// Installs `data` as the whole state of `store` and makes it the current snapshot. A stream file
/// received from a leader is deleted once installed; a snapshot held by another store (openraft's
/// conformance suite hands one over directly) is streamed from it first.
pub(crate) fn install(
    store: &TopicStore,
    snapshots: &SnapshotDir,
    meta: &SnapshotMeta,
    data: SnapshotData,
) -> Result<AppliedState, StoreError> {
    let path = match data {
        SnapshotData::Received { path } => path,
        SnapshotData::Held { manifest, store: source } => {
            let path = snapshots.dir.join(format!("copy-{}.tmp", snapshots.next_nonce()));
            let file =
                std::fs::File::create(&path).map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
            let (_, w) = source.export_snapshot(&manifest, BufWriter::with_capacity(1 << 20, file))?;
            w.into_inner().map_err(|e| StoreError::io("flush snapshot copy", e.into_error()))?;
            path
        }
    };
    let installed = install_file(store, snapshots, meta, &path);
    let _ = std::fs::remove_file(&path);
    installed
}

fn install_file(
    store: &TopicStore,
    snapshots: &SnapshotDir,
    meta: &SnapshotMeta,
    path: &Path,
) -> Result<AppliedState, StoreError> {
    let file = std::fs::File::open(path).map_err(|e| StoreError::io(format!("open snapshot {}", path.display()), e))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let manifest = store.import_snapshot(BufReader::with_capacity(1 << 20, file), &path.display().to_string())?;
    let applied = applied_of(&manifest)?;
    if applied.last_applied != meta.last_log_id {
        return Err(StoreError::CorruptSnapshot {
            path: path.to_path_buf(),
            reason: format!("its data is at {:?} but its metadata says {:?}", applied.last_applied, meta.last_log_id),
        });
    }
    // Nothing newer can be current: openraft installs only a snapshot beyond what is applied.
    snapshots.publish(meta, &manifest)?;
    tracing::info!(snapshot = %meta.snapshot_id, bytes, "installed snapshot");
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use busbar_storage::TopicStoreOptions;
    use openraft::CommittedLeaderId;

    fn store_applied_at(dir: &Path, index: u64) -> TopicStore {
        let store = TopicStore::open(&dir.join("state"), &TopicStoreOptions::default()).unwrap();
        let applied = AppliedState {
            last_applied: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            membership: StoredMembership::default(),
        };
        store.apply(&[None], Bytes::from(codec::encode("applied", &applied).unwrap())).unwrap();
        store
    }

    fn current_index(snapshots: &SnapshotDir) -> Option<u64> {
        snapshots.current().unwrap().and_then(|(meta, _)| meta.last_log_id.map(|l| l.index))
    }

    #[test]
    fn an_unusable_manifest_is_replaced_by_a_fresh_snapshot_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_applied_at(dir.path(), 7);
        let snapshots = SnapshotDir::open(&dir.path().join("snapshots")).unwrap();
        build(&store, &snapshots).unwrap();
        assert_eq!(current_index(&snapshots), Some(7));

        // Damaged: reported by the checksum, then retaken.
        let path = dir.path().join("snapshots").join(CURRENT);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(snapshots.current(), Err(StoreError::Corrupt { .. })));
        reopen(&store, &snapshots).unwrap();
        assert_eq!(current_index(&snapshots), Some(7));

        // Stale: the store installed a snapshot (a new generation) and crashed before publishing it.
        let (_, stream) = store.export_snapshot(&store.capture_snapshot().unwrap(), Vec::new()).unwrap();
        let installed = store.import_snapshot(&stream[..], "test").unwrap();
        let (_, stale) = snapshots.current().unwrap().unwrap();
        assert!(matches!(store.pin_snapshot(&stale), Err(StoreError::SnapshotUnavailable(_))));
        reopen(&store, &snapshots).unwrap();
        let (_, fresh) = snapshots.current().unwrap().unwrap();
        assert_eq!(fresh, installed, "the retaken manifest names the store's current generation");

        // Full-copy files of an older release are deleted, and a snapshot is taken in their place.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("snapshots").join("1-1-5-0.snap"), b"old copy").unwrap();
        std::fs::write(dir.path().join("snapshots").join("current.meta"), b"old meta").unwrap();
        let snapshots = SnapshotDir::open(&dir.path().join("snapshots")).unwrap();
        let left: Vec<_> =
            std::fs::read_dir(dir.path().join("snapshots")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        reopen(&store, &snapshots).unwrap();
        assert_eq!(current_index(&snapshots), Some(7));
    }

    #[test]
    fn a_store_ahead_of_its_batch_files_rolls_back_to_its_snapshot() {
        use busbar_types::{Command, Record, RecordBatch, TopicConfig, TopicName};
        let dir = tempfile::tempdir().unwrap();
        let applied_at = |index: u64| {
            let applied = AppliedState {
                last_applied: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
                membership: StoredMembership::default(),
            };
            Bytes::from(codec::encode("applied", &applied).unwrap())
        };
        let produce = |store: &TopicStore, v: &'static str, index: u64| {
            let record =
                Record { key: None, value: Bytes::from_static(v.as_bytes()), headers: vec![], timestamp_ms: 1 };
            let cmd = Command::Produce {
                topic: TopicName::new("t").unwrap(),
                partition: 0,
                records: RecordBatch::encode(&[record], busbar_types::RecordEncoding::Bincode).unwrap(),
                producer: None,
            };
            store.apply(&[Some(&cmd)], applied_at(index)).unwrap();
        };
        let store = TopicStore::open(&dir.path().join("state"), &TopicStoreOptions::default()).unwrap();
        let snapshots = SnapshotDir::open(&dir.path().join("snapshots")).unwrap();
        let create =
            Command::CreateTopic { name: TopicName::new("t").unwrap(), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], applied_at(1)).unwrap();
        produce(&store, "kept", 2);
        build(&store, &snapshots).unwrap();
        produce(&store, "lost", 3);
        drop(store);
        // A power loss: sled kept the reference to the last batch, its bytes never reached the file.
        let batches = dir.path().join("state").join("batches");
        let file = std::fs::read_dir(&batches).unwrap().flatten().map(|e| e.path()).max().unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 1).unwrap();

        // sled releases its lock when its last internal reference goes, a moment after the drop.
        let store = (0..500)
            .find_map(|_| {
                TopicStore::open(&dir.path().join("state"), &TopicStoreOptions::default())
                    .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
                    .ok()
            })
            .unwrap();
        assert!(store.lost_data().unwrap().is_some());
        reopen(&store, &snapshots).unwrap();
        assert!(store.lost_data().unwrap().is_none());
        let applied = decode_applied(store.applied().unwrap().as_ref()).unwrap();
        assert_eq!(applied.last_applied.map(|l| l.index), Some(2), "back at the snapshot; the log replays 3");
        let r = store.read("t", 0, 0, 10, 1 << 20).unwrap();
        assert_eq!(
            r.records.iter().map(|(_, r)| r.value.clone()).collect::<Vec<_>>(),
            vec![Bytes::from_static(b"kept")]
        );
        // The published manifest names the rebuilt store, so it can be sent and pinned.
        let (_, manifest) = snapshots.current().unwrap().unwrap();
        store.pin_snapshot(&manifest).unwrap();
        assert_eq!(current_index(&snapshots), Some(2));
    }

    #[test]
    fn a_fresh_store_has_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = TopicStore::open(&dir.path().join("state"), &TopicStoreOptions::default()).unwrap();
        let snapshots = SnapshotDir::open(&dir.path().join("snapshots")).unwrap();
        reopen(&store, &snapshots).unwrap();
        assert!(snapshots.current().unwrap().is_none());
    }
}
