//! The state machine's data in sled, and the deterministic apply of commands to it.
//!
//! Layout. The default tree holds one key, `generation`: which set of trees is live. A generation
//! `N` is two trees:
//! - `gN.meta`: `applied` (the replication layer's opaque applied position: last log id and
//!   membership), `next_topic_id`, `t/<name>` → [`TopicMeta`], `p/<topic id><partition>` →
//!   [`PartitionState`], `reclaim/<topic id>` → deleted topics whose batches are still to delete,
//!   `next_producer_id`, `s/<producer id><topic id><partition>` → ([`ProducerState`], its stamp;
//!   see `crate::producers`; a state stored before stamps has none and reads as the oldest),
//!   `grp/<group>` → [`GroupState`] (members, assignments, generation, committed offsets);
//! - `gN.records`: `[topic id][partition][base offset]` → a [`BatchRef`]: where the stored batch
//!   ([`crate::batch`]) is in the batch files ([`crate::batch_files`]), its crc, count and newest
//!   timestamp. The batch bytes themselves are never in sled.
//!
//! The default tree also holds `batches_synced`: how far each batch file was synced at the last
//! [`TopicStore::flush_durable`]. sled may make a reference durable before the bytes it names (it
//! flushes on its own), so at open every reachable reference beyond that mark is read and checked;
//! one that fails means a power loss cut the files short, and the store reports it
//! ([`TopicStore::lost_data`]) for the replication layer to roll back to its snapshot
//! ([`TopicStore::rebuild_from`]) and replay the log from there.
//!
//! Every apply's writes *and* the applied position reach sled together in one transaction over both
//! trees, so after a crash the store is at some applied position with exactly the data up to it.
//! An apply of produce commands only does not commit its own transaction: up to
//! [`MAX_DEFERRED_APPLIES`] such calls share one (see [`Deferred`]). Readers see their batches at
//! once, from memory; a crash loses them from sled, and the Raft log, which still holds those
//! entries, replays them (the log is purged only after [`TopicStore::flush_durable`], which commits
//! first). Why: sled rolls its write buffer twice per transaction and wakes its whole I/O thread pool
//! each time, and at one entry per request that was a third of a node's CPU.
//! Installing a snapshot fills generation N+1 and then flips `generation`, which is atomic.
//!
//! Nothing is ever deleted by apply itself: deleting a topic hides it (its id is never reused) and
//! queues its batches for [`TopicStore::reclaim`], which runs only while no snapshot export is
//! reading. That is what lets an export read a consistent point-in-time view while appends go on:
//! the data is append-only and bounded by the end offsets captured at the snapshot's index.
//!
//! Two things change a committed reference. [`TopicStore::compact`] copies the live batches of
//! mostly dead batch files into a new file and points their references there (same key, same
//! bytes), so that the old files can go. It runs while no export or reclaim does, makes the copies
//! and then the new references durable before it releases the old files, and waits for readers
//! that may hold an old reference (`relocation`). And from apply version 3 on, apply merges small
//! batches into the partition's last one (see [`TAIL_MERGE_BYTES`]): the last batch's key then
//! names a new, longer version. Versions of a key only ever grow, so of two a reader finds the one
//! with more records is the newer. A merge into a batch a pinned snapshot names is fdatasynced
//! before sled may hold the new reference (that snapshot's export reads the key, and must find its
//! bytes after a power loss too), and the superseded version is released only after the next
//! durable flush (until then sled on disk may still name it), while no reader is between finding
//! and reading a reference.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use busbar_types::{
    Command, CommandResponse, ErrorCode, GroupName, ProducerSeq, Record, RecordBatch, RecordEncoding, TopicConfig,
    TopicName,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::apply_version::{APPLY_VERSION, BOUNDED_PRODUCERS, LEGACY_APPLY_VERSION, MERGED_TAILS, VARINT_RECORDS};
use crate::batch_files::{BatchFiles, BatchRef, FileUse, GenerationUse, Lane};
use crate::groups::{GroupState, Topics};
use crate::snapshot_file::{FrameKind, FrameReader, FrameWriter};
use crate::snapshot_manifest::{Pin, SnapshotHeader, SnapshotManifest};
use crate::{batch, checked, durable, StoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub id: u32,
    pub name: TopicName,
    pub partitions: u32,
    /// The keys set on this topic; unset keys take the cluster defaults (applied by the caller).
    pub config: TopicConfig,
}

/// A partition's offsets: records live at `start_offset..end_offset`; `end_offset` is the high
/// watermark, the next offset to assign.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub start_offset: u64,
    pub end_offset: u64,
    /// Bytes of the stored batches at `start_offset..end_offset` (what retention.bytes bounds).
    pub bytes: u64,
}

pub(crate) use crate::producers::ProducerKey;
use crate::producers::{self, ProducerTable};
pub use crate::producers::{ProducerState, DEFAULT_MAX_PRODUCER_STATES, PRODUCER_WINDOW};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: TopicName,
    pub partitions: u32,
    pub id: u32,
    pub config: TopicConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
    /// Bytes the partition's batches take (stored size, before sled's own overhead).
    pub bytes: u64,
}

/// A consumer group as the API shows it: topic ids resolved to names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupView {
    pub name: String,
    pub generation: u64,
    pub rebalancing: bool,
    pub members: Vec<MemberView>,
    /// Every partition the group subscribes to or has an offset for.
    pub partitions: Vec<GroupPartitionView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberView {
    pub id: String,
    pub topics: Vec<String>,
    pub session_timeout_ms: u32,
    pub assigned: Vec<(String, u32)>,
    pub revoking: Vec<(String, u32)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPartitionView {
    pub topic: String,
    pub partition: u32,
    pub committed: Option<u64>,
    pub start_offset: u64,
    pub end_offset: u64,
    /// Member consuming it, if any.
    pub owner: Option<String>,
}

impl GroupPartitionView {
    /// Records not yet consumed: end offset minus committed offset (from the start offset when the
    /// group has committed nothing there).
    pub fn lag(&self) -> u64 {
        self.end_offset.saturating_sub(self.committed.unwrap_or(self.start_offset).max(self.start_offset))
    }
}

/// What a read returns. A record's key and values may be slices of the stored batch it was read
/// from (a varint batch's are; see [`batch::decode_shared`]): while it lives it keeps that batch's
/// buffer, at most four times the bytes of the records taken from it (past that they are copied
/// out; see [`copy_out_if_sparse`]). Meant to be sent out, not kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchResult {
    pub records: Vec<(u64, Record)>,
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Clone, Debug)]
pub struct TopicStoreOptions {
    /// sled's page cache, in sled's on-disk page bytes (a cached page takes about twice that in
    /// memory). sled keeps every page it wrote or read until the cache is full, so below this a
    /// node's memory grows with its data; past it, only sled's per-page bookkeeping still grows
    /// (about 0.35 MiB per GiB stored, docs/benchmarks.md).
    pub cache_bytes: u64,
    /// The most idempotent-producer states (one per producer id and partition written) kept; past it
    /// the least recently used are evicted (see `producers`). Part of the replicated state machine:
    /// every node of a cluster must use the same value. At least 1.
    pub max_producer_states: usize,
    /// A batch file is closed for appends at this size ([`crate::batch_files::FILE_BYTES`]; tests
    /// use small files to exercise rotation and compaction).
    pub batch_file_bytes: u64,
    /// References one compaction round looks at, at most ([`COMPACT_SCAN_REFS`]); the next round
    /// goes on from there. At least 1.
    pub compact_scan_refs: usize,
}

impl TopicStoreOptions {
    /// The default cache: 16 MiB (`--store-cache-mib`).
    pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;
}

impl Default for TopicStoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: Self::DEFAULT_CACHE_BYTES,
            max_producer_states: DEFAULT_MAX_PRODUCER_STATES,
            batch_file_bytes: crate::batch_files::FILE_BYTES,
            compact_scan_refs: COMPACT_SCAN_REFS,
        }
    }
}

/// What apply and reads consult in memory. Replaced whole (copy on write) after each applied batch,
/// only once the batches it reaches are stored and their references are in sled or among the
/// uncommitted ones, so a reader never sees an end offset whose data it cannot find.
#[derive(Clone, Debug, Default)]
struct Meta {
    topics: BTreeMap<TopicName, TopicMeta>,
    partitions: HashMap<(u32, u32), PartitionState>,
    next_topic_id: u32,
    next_producer_id: u64,
    applied: Option<Bytes>,
    /// The rules apply follows (see `crate::apply_version`).
    apply_version: u32,
}

#[derive(Clone)]
struct Generation {
    id: u64,
    meta_tree: sled::Tree,
    records: sled::Tree,
}

#[derive(Clone)]
struct Current {
    generation: Generation,
    meta: Arc<Meta>,
}

/// The state machine's storage. Cheap to clone; one applier at a time, any number of readers.
#[derive(Clone)]
pub struct TopicStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    path: PathBuf,
    current: RwLock<Current>,
    /// Serializes apply and snapshot import (openraft calls them one at a time anyway; this makes it
    /// an invariant of the store rather than of its caller).
    apply_lock: Mutex<()>,
    /// Exports hold it shared; physical deletion (reclaim, dropping an old generation) takes it
    /// exclusively and skips its turn when an export runs.
    export_guard: RwLock<()>,
    /// What the published snapshot manifest names and, while a new one is being published, that one
    /// too: reclaim keeps it (see `snapshot_manifest`). Reclaim reads the state before the pin, so a
    /// capture after its read names nothing below the start offsets it read.
    pin: Mutex<Option<Pin>>,
    /// Generations replaced by a snapshot install, waiting to be dropped.
    retired: Mutex<Vec<u64>>,
    /// Idempotent producers' recent batches. Only apply reads and writes them (under `apply_lock`),
    /// so they live apart from `Meta`, which is copied on every apply.
    producers: Mutex<ProducerTable>,
    /// `TopicStoreOptions::max_producer_states`.
    max_producer_states: usize,
    /// Consumer groups. Written by apply (under `apply_lock`; a group change is never deferred); read by
    /// the API.
    groups: RwLock<BTreeMap<String, GroupState>>,
    /// Committed group offsets retention moved up to a partition's new start, since this process
    /// started (a metric: those groups skip records they never consumed).
    group_offsets_moved: std::sync::atomic::AtomicU64,
    /// The bytes of every stored batch.
    files: BatchFiles,
    /// Serializes `flush_durable`.
    flushing: Mutex<()>,
    /// Readers of batch bytes hold it shared from looking a reference up until they have read it;
    /// compaction takes it exclusively to release the files it emptied, so a reference a reader
    /// found before compaction replaced it still names a file that is there.
    relocation: RwLock<()>,
    /// One compaction at a time (its lane has one appender), and where the next round's scan of the
    /// references starts.
    compacting: Mutex<ScanCursor>,
    /// [`TopicStoreOptions::compact_scan_refs`].
    compact_scan_refs: usize,
    /// What compaction did since open (a metric).
    compacted: Mutex<CompactionSummary>,
    /// Batch files compaction found a damaged batch in: left alone until the store is reopened.
    unmovable: Mutex<BTreeSet<u64>>,
    /// Test hook: a compaction round stops dead at this step, as a crash there would leave it.
    #[cfg(test)]
    compaction_crash: Mutex<Option<CompactionStep>>,
    /// Applies whose writes wait for a shared transaction. Changed only under `apply_lock` (or by
    /// `Drop`, when nothing else holds the store).
    deferred: Mutex<Deferred>,
    /// The batch references of those applies, for readers (see [`MergedRefs`]).
    uncommitted_refs: RwLock<UncommittedRefs>,
    /// Set at open when a reachable reference names bytes that are not on disk (see the module
    /// documentation); cleared by [`TopicStore::rebuild_from`].
    lost: Mutex<Option<String>>,
    /// Versions of merged tail batches that a newer version replaced (see [`TAIL_MERGE_BYTES`]):
    /// released after the next durable flush. Added to under `apply_lock` (and by a flush whose
    /// sync failed, giving back what it took).
    superseded: Mutex<Vec<BatchRef>>,
}

impl Inner {
    /// Releases references nothing names any more (deleted, replaced, moved) while no reader is
    /// between finding a reference and reading it, then unlinks the files left with none (after
    /// readers may go on: they hold the files they already found open). Returns those files.
    fn release_published<'a>(&self, refs: impl Iterator<Item = &'a BatchRef>) -> Result<Vec<u64>, StoreError> {
        let emptied = {
            let _no_readers = self.relocation.write().map_err(lock_err)?;
            self.files.release_keeping_files(refs)?
        };
        self.files.unlink_released(&emptied)?;
        Ok(emptied)
    }

    /// Commits the deferred applies' writes to `generation` (the current one) in one transaction.
    /// The caller holds `apply_lock`.
    fn commit_deferred(&self, generation: &Generation) -> Result<(), StoreError> {
        let mut deferred = self.deferred.lock().map_err(lock_err)?;
        if deferred.applies == 0 {
            return Ok(());
        }
        let records_batch = {
            let u = self.uncommitted_refs.read().map_err(lock_err)?;
            if u.generation != generation.id {
                return Err(StoreError::corrupt(
                    "apply",
                    format!("uncommitted batches of generation {} in generation {}", u.generation, generation.id),
                ));
            }
            let mut b = sled::Batch::default();
            for (k, v) in &u.refs {
                b.insert(k, v);
            }
            b
        };
        if deferred.merged_tails {
            // A merged tail replaced a reference a pinned snapshot's export reads (to rebuild this
            // store after a power loss, too): its bytes must be on disk before sled, which flushes
            // on its own, can name them. Not under `flushing` (apply must not wait for a whole
            // flush of sled): `BatchFiles::sync` never claims what another sync still runs.
            self.files.sync()?;
        }
        let meta_batch = deferred.meta.to_batch();
        (&generation.meta_tree, &generation.records)
            .transaction(|(m, r)| {
                m.apply_batch(&meta_batch)?;
                r.apply_batch(&records_batch)?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => StoreError::corrupt("apply", "transaction aborted"),
            })?;
        *deferred = Deferred::default();
        // In sled now, so dropped from memory (see `MergedRefs` for why readers miss none). All of
        // them: only apply adds references, and it holds `apply_lock`, as the caller does.
        self.uncommitted_refs.write().map_err(lock_err)?.refs.clear();
        Ok(())
    }
}

impl Drop for Inner {
    /// Commits what deferred applies left, so that a clean stop does not make the log replay them.
    /// After a crash the log replays them anyway; so a failure here is only logged.
    fn drop(&mut self) {
        let generation = match self.current.read() {
            Ok(cur) => cur.generation.clone(),
            Err(_) => return,
        };
        if let Err(e) = self.commit_deferred(&generation) {
            tracing::warn!(error = %e, "could not commit the last applies to sled at close; the log replays them");
        }
    }
}

const GENERATION_KEY: &[u8] = b"generation";
const APPLIED_KEY: &[u8] = b"applied";
const NEXT_TOPIC_ID_KEY: &[u8] = b"next_topic_id";
const NEXT_PRODUCER_ID_KEY: &[u8] = b"next_producer_id";
const APPLY_VERSION_KEY: &[u8] = b"apply_version";
const BATCHES_SYNCED_KEY: &[u8] = b"batches_synced";
/// Present once the store keeps batch bytes in batch files; a store without it is of an earlier
/// release, with the batches in sled, and is converted at open.
const LAYOUT_KEY: &[u8] = b"layout";
const LAYOUT_BATCH_FILES: u32 = 2;
/// Producer ids start at 1: 0 means "not idempotent" on the wire.
const FIRST_PRODUCER_ID: u64 = 1;

fn tree_names(gen: u64) -> (String, String) {
    (format!("g{gen}.meta"), format!("g{gen}.records"))
}

fn topic_key(name: &TopicName) -> Vec<u8> {
    [b"t/".as_slice(), name.as_str().as_bytes()].concat()
}

fn partition_key(topic_id: u32, partition: u32) -> Vec<u8> {
    [b"p/".as_slice(), &topic_id.to_be_bytes(), &partition.to_be_bytes()].concat()
}

fn producer_key((pid, topic_id, partition): ProducerKey) -> Vec<u8> {
    [b"s/".as_slice(), &pid.to_be_bytes(), &topic_id.to_be_bytes(), &partition.to_be_bytes()].concat()
}

fn group_key(name: &str) -> Vec<u8> {
    [b"grp/".as_slice(), name.as_bytes()].concat()
}

/// Marks a partition whose batches below its start offset are still to be deleted (retention).
fn trim_key(topic_id: u32, partition: u32) -> Vec<u8> {
    [b"trim/".as_slice(), &topic_id.to_be_bytes(), &partition.to_be_bytes()].concat()
}

/// Copies the records a read took from one stored batch out of it when they are under a quarter of
/// its bytes: a consumer reading one record at a time from large batches would otherwise keep a
/// whole batch (up to `max_batch_bytes`) alive per record in each queued response (a `Subscribe`
/// queues several), instead of the bytes it asked for.
fn copy_out_if_sparse(taken: &mut [(u64, Record)], taken_bytes: usize, stored_len: usize) {
    if taken_bytes.saturating_mul(4) >= stored_len {
        return;
    }
    let copy = |b: &mut Bytes| *b = Bytes::copy_from_slice(b);
    for (_, r) in taken {
        if let Some(k) = r.key.as_mut() {
            copy(k);
        }
        copy(&mut r.value);
        r.headers.iter_mut().for_each(|h| copy(&mut h.value));
    }
}

fn topic_info(t: &TopicMeta) -> TopicInfo {
    TopicInfo { name: t.name.clone(), partitions: t.partitions, id: t.id, config: t.config }
}

fn reclaim_key(topic_id: u32) -> Vec<u8> {
    [b"reclaim/".as_slice(), &topic_id.to_be_bytes()].concat()
}

fn lock_err<T>(_: T) -> StoreError {
    StoreError::corrupt("topic store lock", "a thread panicked while holding it")
}

/// What an export wrote.
#[derive(Clone, Copy, Debug)]
pub struct ExportSummary {
    pub batches: u64,
    pub bytes: u64,
}

impl TopicStore {
    pub fn open(path: &Path, opts: &TopicStoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(path).cache_capacity(opts.cache_bytes).open()?;
        let (gen_id, batches_in_sled) = match db.get(GENERATION_KEY)? {
            Some(v) => {
                (checked::open_bincode::<u64>(&|| "generation pointer".into(), &v)?, db.get(LAYOUT_KEY)?.is_none())
            }
            None => {
                db.insert(GENERATION_KEY, checked::seal_bincode("generation", &0u64)?)?;
                db.insert(LAYOUT_KEY, checked::seal_bincode("layout", &LAYOUT_BATCH_FILES)?)?;
                (0, false)
            }
        };
        // Trees of other generations are leftovers: an old one not dropped yet, or a half-built
        // install that crashed before the flip. Neither is reachable; drop them.
        let keep = tree_names(gen_id);
        for name in db.tree_names() {
            let name_str = String::from_utf8_lossy(&name).to_string();
            if name_str.starts_with('g') && name_str != keep.0 && name_str != keep.1 {
                db.drop_tree(&name)?;
            }
        }
        let generation = open_generation(&db, gen_id)?;
        let meta = load_meta(&generation.meta_tree)?;
        let producers = load_producers(&generation.meta_tree)?;
        let groups = load_groups(&generation.meta_tree)?;
        let files = BatchFiles::open(&path.join("batches"), opts.batch_file_bytes)?;
        if batches_in_sled {
            move_batches_to_files(&db, &generation, &files)?;
        }
        let synced: BTreeMap<u64, u64> = match db.get(BATCHES_SYNCED_KEY)? {
            Some(v) => checked::open_bincode(&|| "batch files sync mark".into(), &v)?,
            None => BTreeMap::new(),
        };
        for seq in synced.keys() {
            files.reserve_numbers_through(*seq)?;
        }
        files.reset_counts()?;
        let lost = count_references(&generation, &meta, &files, &synced)?;
        if let Some(reason) = &lost {
            tracing::error!(%reason, "the store names batch bytes that are not on disk");
        }
        files.drop_unreferenced(gen_id)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                current: RwLock::new(Current { generation, meta: Arc::new(meta) }),
                apply_lock: Mutex::new(()),
                export_guard: RwLock::new(()),
                pin: Mutex::new(None),
                retired: Mutex::new(Vec::new()),
                producers: Mutex::new(ProducerTable::new(producers)),
                max_producer_states: opts.max_producer_states.max(1),
                groups: RwLock::new(groups),
                group_offsets_moved: std::sync::atomic::AtomicU64::new(0),
                files,
                flushing: Mutex::new(()),
                relocation: RwLock::new(()),
                compacting: Mutex::new(ScanCursor::default()),
                compact_scan_refs: opts.compact_scan_refs.max(1),
                compacted: Mutex::new(CompactionSummary::default()),
                unmovable: Mutex::new(BTreeSet::new()),
                #[cfg(test)]
                compaction_crash: Mutex::new(None),
                deferred: Mutex::new(Deferred::default()),
                uncommitted_refs: RwLock::new(UncommittedRefs { generation: gen_id, refs: BTreeMap::new() }),
                lost: Mutex::new(lost),
                superseded: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Why the store cannot be used as it is, if it cannot: at open, a batch it references (one a
    /// reader could reach) was missing or damaged beyond what the last `flush_durable` synced — the
    /// bytes did not reach the disk before a power loss while sled's reference did. The store is
    /// then ahead of its data; [`TopicStore::rebuild_from`] rolls it back.
    pub fn lost_data(&self) -> Result<Option<String>, StoreError> {
        Ok(self.inner.lost.lock().map_err(lock_err)?.clone())
    }

    /// Replaces the whole store with what `manifest` names (its published snapshot; `None`: no
    /// snapshot was ever taken, so the empty store), as an install would: the batches it names were
    /// synced before it was published, so they are whole. The Raft log holds every entry after it,
    /// and replays them. Returns the manifest of the rebuilt store (`None` for the empty store).
    pub fn rebuild_from(&self, manifest: Option<&SnapshotManifest>) -> Result<Option<SnapshotManifest>, StoreError> {
        let tmp = self.inner.path.join("rebuild.tmp");
        let io = |what: &str, e: std::io::Error| StoreError::io(format!("{what} {}", tmp.display()), e);
        let file = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        let w = match manifest {
            Some(m) => self.export_snapshot(m, w)?.1,
            None => {
                let header = SnapshotHeader {
                    applied: None,
                    next_topic_id: 0,
                    next_producer_id: FIRST_PRODUCER_ID,
                    topics: Vec::new(),
                    partitions: Vec::new(),
                    producers: Vec::new(),
                    groups: Vec::new(),
                    producer_stamps: Vec::new(),
                    apply_version: LEGACY_APPLY_VERSION,
                };
                let mut fw = FrameWriter::new(w).map_err(|e| io("write", e))?;
                fw.frame(FrameKind::Header, &[&header.encode()?]).map_err(|e| io("write", e))?;
                fw.frame(FrameKind::End, &[&0u64.to_le_bytes()]).map_err(|e| io("write", e))?;
                fw.into_inner()
            }
        };
        w.into_inner().map_err(|e| io("flush", e.into_error()))?;
        let file = std::fs::File::open(&tmp).map_err(|e| io("open", e))?;
        let rebuilt = self.import_snapshot(std::io::BufReader::with_capacity(1 << 20, file), "store rebuild");
        let _ = std::fs::remove_file(&tmp);
        let rebuilt = rebuilt?;
        *self.inner.lost.lock().map_err(lock_err)? = None;
        Ok(manifest.map(|_| rebuilt))
    }

    fn current(&self) -> Result<Current, StoreError> {
        Ok(self.inner.current.read().map_err(lock_err)?.clone())
    }

    /// The batch references in `from..to`, committed or not (see [`MergedRefs`]).
    fn batch_refs(&self, cur: &Current, from: [u8; 16], to: [u8; 16]) -> Result<MergedRefs, StoreError> {
        let uncommitted =
            self.with_uncommitted(cur, &from, &to, |r| r.map(|(k, v)| (k.clone(), v.clone())).collect())?;
        Ok(MergedRefs {
            committed: cur.generation.records.range(from..to).peekable(),
            uncommitted: Vec::into_iter(uncommitted.unwrap_or_default()).peekable(),
        })
    }

    /// Runs `f` on the uncommitted references in `from..to`, if they are of `cur`'s generation.
    fn with_uncommitted<T>(
        &self,
        cur: &Current,
        from: &[u8],
        to: &[u8],
        f: impl FnOnce(std::collections::btree_map::Range<'_, sled::IVec, sled::IVec>) -> T,
    ) -> Result<Option<T>, StoreError> {
        let u = self.inner.uncommitted_refs.read().map_err(lock_err)?;
        if u.generation != cur.generation.id || from >= to {
            return Ok(None);
        }
        Ok(Some(f(u.refs.range::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Excluded(to))))))
    }

    /// The applied position last written by `apply` or a snapshot install (opaque to this crate).
    pub fn applied(&self) -> Result<Option<Bytes>, StoreError> {
        Ok(self.current()?.meta.applied.clone())
    }

    /// The rules apply follows now (`crate::apply_version`).
    pub fn apply_version(&self) -> Result<u32, StoreError> {
        Ok(self.current()?.meta.apply_version)
    }

    /// Applies commands in log order. `None` stands for a log entry with no command (blank or
    /// membership). `applied_after` is the position after the last entry; it is written in the same
    /// atomic transaction as the data.
    pub fn apply(
        &self,
        commands: &[Option<&Command>],
        applied_after: Bytes,
    ) -> Result<Vec<CommandResponse>, StoreError> {
        let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
        let cur = self.current()?;
        if self.inner.superseded.lock().map_err(lock_err)?.len() >= MAX_SUPERSEDED {
            // Bounded memory: no snapshot made the store durable for a long while.
            let superseded = self.commit_taking_superseded(&cur.generation)?;
            self.sync_then_release(superseded)?;
        }
        let defer = commands.iter().all(|c| c.is_none_or(defers_commit));
        if !defer {
            // Whatever else it does (a retention cut sizes batches, a deletion queues them) reads
            // sled, which must then hold every batch stored before.
            self.inner.commit_deferred(&cur.generation)?;
        }
        let mut producers = self.inner.producers.lock().map_err(lock_err)?;
        let producers = &mut *producers;
        // Read-locked for the whole apply (only apply writes groups, under `apply_lock`); copied only
        // if a command changes a group, so a produce does not clone every group.
        let groups_now = self.inner.groups.read().map_err(lock_err)?;
        let mut w = Work {
            meta: (*cur.meta).clone(),
            producers: &producers.states,
            producer_clock: producers.clock,
            producers_live: producers.states.len(),
            touched: HashMap::new(),
            groups: Cow::Borrowed(&*groups_now),
            touched_groups: BTreeSet::new(),
            records_tree: cur.generation.records.clone(),
            files: &self.inner.files,
            generation: cur.generation.id,
            group_offsets_moved: 0,
            meta_batch: TreeWrites::default(),
            records_batch: BTreeMap::new(),
            uncommitted: &self.inner.uncommitted_refs,
            superseded: Vec::new(),
            pin: &self.inner.pin,
            merged_pinned: false,
            staged: BTreeMap::new(),
            pending: BTreeMap::new(),
        };
        let mut responses = Vec::with_capacity(commands.len());
        for cmd in commands {
            let resp = match cmd {
                None => CommandResponse::Empty,
                Some(cmd) => {
                    let resp = w.apply_one(cmd)?;
                    // Each entry's records are stored when the entry is done: which entries one apply
                    // call gets differs between nodes, and batch boundaries must not (retention cuts
                    // at them). A merge into the partition's last batch (version 3) is decided by that
                    // batch alone, wherever it is, so it does not depend on the call either. The same
                    // goes for which producer states are evicted.
                    w.store_pending()?;
                    w.evict_producers(self.inner.max_producer_states)?;
                    resp
                }
            };
            responses.push(resp);
        }
        let Work {
            mut meta,
            touched,
            producer_clock,
            mut meta_batch,
            records_batch,
            superseded,
            merged_pinned,
            groups,
            touched_groups,
            group_offsets_moved,
            ..
        } = w;
        for name in &touched_groups {
            match groups.get(name) {
                Some(g) => meta_batch.insert(group_key(name), checked::seal_bincode("group", g)?),
                None => meta_batch.remove(group_key(name)),
            }
        }
        let changed_groups = match groups {
            Cow::Owned(g) => Some(g),
            Cow::Borrowed(_) => None,
        };
        drop(groups_now);
        meta.applied = Some(applied_after.clone());
        meta_batch.insert(APPLIED_KEY, checked::seal(&applied_after));

        // Queued for the shared transaction; the references visible to readers before the end
        // offsets that reach them are published.
        let due = {
            let mut deferred = self.inner.deferred.lock().map_err(lock_err)?;
            deferred.meta.merge(meta_batch);
            deferred.applies += 1;
            deferred.merged_tails |= merged_pinned;
            self.inner.superseded.lock().map_err(lock_err)?.extend(superseded);
            let mut refs = self.inner.uncommitted_refs.write().map_err(lock_err)?;
            refs.refs.extend(records_batch);
            !defer || deferred.applies >= MAX_DEFERRED_APPLIES || refs.refs.len() >= MAX_DEFERRED_REFS
        };
        if due {
            self.inner.commit_deferred(&cur.generation)?;
        }
        self.inner.current.write().map_err(lock_err)?.meta = Arc::new(meta);
        for (k, st) in touched {
            match st {
                Some(st) => producers.states.insert(k, st),
                None => producers.states.remove(&k),
            };
        }
        producers.clock = producer_clock;
        if let Some(groups) = changed_groups {
            *self.inner.groups.write().map_err(lock_err)? = groups;
        }
        self.inner.group_offsets_moved.fetch_add(group_offsets_moved, std::sync::atomic::Ordering::Relaxed);
        Ok(responses)
    }

    pub fn list_topics(&self) -> Result<Vec<TopicInfo>, StoreError> {
        let cur = self.current()?;
        Ok(cur.meta.topics.values().map(topic_info).collect())
    }

    /// [`topic`](Self::topic) and [`apply_version`](Self::apply_version) from one look at the
    /// store's state: what a produce request needs, once per request.
    pub fn topic_and_apply_version(&self, name: &str) -> Result<(Option<TopicInfo>, u32), StoreError> {
        let cur = self.current()?;
        let topic = cur.meta.topics.values().find(|t| t.name.as_str() == name).map(topic_info);
        Ok((topic, cur.meta.apply_version))
    }

    pub fn topic(&self, name: &str) -> Result<Option<TopicInfo>, StoreError> {
        let cur = self.current()?;
        Ok(cur.meta.topics.values().find(|t| t.name.as_str() == name).map(topic_info))
    }

    /// The end offset of one partition (as [`TopicStore::partition_offsets`] has it).
    pub fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        let cur = self.current()?;
        let t = find_topic(&cur.meta, topic, partition)?;
        Ok(cur.meta.partitions.get(&(t.id, partition)).map_or(0, |s| s.end_offset))
    }

    pub fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, StoreError> {
        let cur = self.current()?;
        let t = find_topic(&cur.meta, topic, 0)?;
        Ok((0..t.partitions)
            .map(|p| {
                let s = cur.meta.partitions.get(&(t.id, p)).copied().unwrap_or_default();
                PartitionOffsets {
                    partition: p,
                    start_offset: s.start_offset,
                    end_offset: s.end_offset,
                    bytes: s.bytes,
                }
            })
            .collect())
    }

    /// Reads committed records of one partition from `offset`: at most `max_records`, and stops
    /// once `max_bytes` is reached (but always returns at least one record when one exists, so a
    /// record larger than `max_bytes` cannot block a consumer).
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<FetchResult, StoreError> {
        // Held until the bytes are read: compaction and reclaim may replace or delete a reference
        // found below, but not release the file it names meanwhile.
        let _stable = self.inner.relocation.read().map_err(lock_err)?;
        self.read_stable(topic, partition, offset, max_records, max_bytes)
    }

    /// [`read`](Self::read), unless that would wait: `None` while compaction or reclaim is
    /// releasing files (or waiting to, behind a long read). For callers on an async runtime, which
    /// must not block a worker thread; they read on a blocking thread instead.
    pub fn try_read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Result<FetchResult, StoreError>> {
        let _stable = match self.inner.relocation.try_read() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return None,
            Err(TryLockError::Poisoned(_)) => return Some(Err(lock_err(()))),
        };
        Some(self.read_stable(topic, partition, offset, max_records, max_bytes))
    }

    /// The body of [`read`](Self::read); the caller holds `relocation` shared.
    fn read_stable(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<FetchResult, StoreError> {
        let cur = self.current()?;
        let t = find_topic(&cur.meta, topic, partition)?;
        let state = cur.meta.partitions.get(&(t.id, partition)).copied().unwrap_or_default();
        let out_of_range = || StoreError::OffsetOutOfRange {
            topic: topic.to_string(),
            partition,
            requested: offset,
            start: state.start_offset,
            end: state.end_offset,
        };
        if offset < state.start_offset || offset > state.end_offset {
            return Err(out_of_range());
        }
        let mut result =
            FetchResult { records: Vec::new(), start_offset: state.start_offset, end_offset: state.end_offset };
        if offset == state.end_offset || max_records == 0 {
            return Ok(result);
        }
        // The batch holding `offset` is the last one whose base offset is <= offset: in memory if
        // not committed yet, else in sled (memory first, for the reason `MergedRefs` gives).
        let (from, past) = (batch::key(t.id, partition, 0), batch::key(t.id, partition, offset.saturating_add(1)));
        let first_key =
            match self.with_uncommitted(&cur, &from, &past, |mut r| r.next_back().map(|(k, _)| k.clone()))? {
                Some(Some(k)) => Some(k),
                _ => cur.generation.records.range(from..past).next_back().transpose()?.map(|(k, _)| k),
            };
        let Some(first_base) = first_key.map(|k| batch::parse_key(&k).map(|(_, _, base)| base).unwrap_or(0)) else {
            return Err(missing_batch(topic, partition, offset));
        };
        // Bounded by the end offset this reader saw: batches beyond it may be mid-apply.
        let mut next_expected = None;
        let mut bytes = 0usize;
        let range = (batch::key(t.id, partition, first_base), batch::key(t.id, partition, state.end_offset));
        for kv in self.batch_refs(&cur, range.0, range.1)? {
            let (k, v) = kv?;
            let Some((_, _, base)) = batch::parse_key(&k) else {
                return Err(StoreError::corrupt(format!("{topic}/{partition}"), "malformed batch key"));
            };
            if let Some(expected) = next_expected {
                if base != expected {
                    return Err(StoreError::corrupt(
                        format!("{topic}/{partition}"),
                        format!("batches are not contiguous: expected base offset {expected}, found {base}"),
                    ));
                }
            }
            let what = || format!("batch {topic}/{partition}@{base}");
            let stored = self.inner.files.read(&what, &BatchRef::decode(&what, &v)?)?;
            let stored_len = stored.len();
            // The records share `stored` rather than copying out of it: they live until the
            // response is written out.
            let batch_records = batch::decode_shared(&what, Bytes::from(stored))?;
            next_expected = Some(base + batch_records.len() as u64);
            let (first_taken, bytes_before) = (result.records.len(), bytes);
            let mut full = false;
            for (i, record) in batch_records.into_iter().enumerate() {
                let off = base + i as u64;
                if off < offset {
                    continue;
                }
                if off >= state.end_offset {
                    // A tail merged into since this reader took the end offset.
                    full = true;
                    break;
                }
                bytes += record.encoded_len_hint();
                result.records.push((off, record));
                if result.records.len() >= max_records || bytes >= max_bytes {
                    full = true;
                    break;
                }
            }
            if let Some(taken) = result.records.get_mut(first_taken..) {
                copy_out_if_sparse(taken, bytes - bytes_before, stored_len);
            }
            if full {
                return Ok(result);
            }
        }
        if result.records.is_empty() {
            return Err(missing_batch(topic, partition, offset));
        }
        Ok(result)
    }

    /// Makes everything applied so far durable, against power loss (see [`crate::durable`]).
    /// Called before the Raft log below the applied index may be purged.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        let superseded = {
            let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
            self.commit_taking_superseded(&self.current()?.generation)?
        };
        self.sync_then_release(superseded)
    }

    /// Makes the store durable, then releases the replaced tail versions taken before; if the
    /// sync fails they wait for the next flush again.
    fn sync_then_release(&self, superseded: Vec<BatchRef>) -> Result<(), StoreError> {
        if let Err(e) = self.sync_committed() {
            if let Ok(mut waiting) = self.inner.superseded.lock() {
                waiting.extend(superseded);
            }
            return Err(e);
        }
        self.release_superseded(&superseded)
    }

    /// Commits the deferred applies and takes the tail versions replaced so far: once the store is
    /// synced, sled on disk names none of them. The caller holds `apply_lock`.
    fn commit_taking_superseded(&self, generation: &Generation) -> Result<Vec<BatchRef>, StoreError> {
        self.inner.commit_deferred(generation)?;
        Ok(std::mem::take(&mut *self.inner.superseded.lock().map_err(lock_err)?))
    }

    /// Releases replaced tail versions (taken by [`commit_taking_superseded`] before a durable
    /// sync), while no reader is between finding a reference and reading it.
    ///
    /// [`commit_taking_superseded`]: Self::commit_taking_superseded
    fn release_superseded(&self, superseded: &[BatchRef]) -> Result<(), StoreError> {
        if !superseded.is_empty() {
            self.inner.release_published(superseded.iter())?;
        }
        Ok(())
    }

    /// Makes what sled holds durable, and the batch files under it (no deferred applies: the
    /// caller committed them).
    fn sync_committed(&self) -> Result<(), StoreError> {
        // One at a time: a second caller must not write a mark while the first's fdatasyncs run.
        let _one = self.inner.flushing.lock().map_err(lock_err)?;
        // The batch bytes first, then sled's references to them (and the mark saying how far the
        // files are synced, which `open` trusts).
        let synced = self.inner.files.sync()?;
        self.inner.db.insert(BATCHES_SYNCED_KEY, checked::seal_bincode("batch files sync mark", &synced)?)?;
        self.inner.db.flush()?;
        durable::fsync_tree(&self.inner.path, &[self.inner.files.dir()])
    }

    /// Takes a snapshot of the store at its last applied position, as a manifest naming the batches
    /// rather than a copy of them, and pins it: from now on reclaim keeps every batch it names. Cheap
    /// (metadata only); appends may continue as soon as it returns.
    pub fn capture_snapshot(&self) -> Result<SnapshotManifest, StoreError> {
        // The metadata, producer and group states of one and the same applied position: taken
        // together while no apply runs.
        let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
        let cur = self.current()?;
        // An export reads the batches the manifest names from sled.
        self.inner.commit_deferred(&cur.generation)?;
        let (producers, producer_stamps): (Vec<_>, Vec<_>) = self
            .inner
            .producers
            .lock()
            .map_err(lock_err)?
            .states
            .iter()
            .map(|(k, v)| ((*k, v.clone()), (*k, v.last_used)))
            .unzip();
        let groups: Vec<_> =
            self.inner.groups.read().map_err(lock_err)?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let meta = &cur.meta;
        let mut partitions: Vec<_> = meta.partitions.iter().map(|(&(t, p), s)| (t, p, *s)).collect();
        partitions.sort_by_key(|(t, p, _)| (*t, *p));
        let header = SnapshotHeader {
            applied: meta.applied.as_ref().map(|b| b.to_vec()),
            next_topic_id: meta.next_topic_id,
            next_producer_id: meta.next_producer_id,
            topics: meta.topics.values().cloned().collect(),
            partitions,
            producers,
            groups,
            producer_stamps,
            apply_version: meta.apply_version,
        };
        let manifest = SnapshotManifest::new(cur.generation.id, &header)?;
        let pin = Pin::of(&manifest)?;
        let mut pinned = self.inner.pin.lock().map_err(lock_err)?;
        *pinned = Some(match pinned.take() {
            Some(published) => published.merged(pin),
            None => pin,
        });
        Ok(manifest)
    }

    /// Pins exactly `manifest`, one this store made (by capture or import): reclaim keeps what it
    /// names and no longer what earlier manifests named. Called once a captured manifest is
    /// published, and when a node reopens its store and its published manifest. A manifest of
    /// another generation is refused: this store no longer holds its data.
    pub fn pin_snapshot(&self, manifest: &SnapshotManifest) -> Result<(), StoreError> {
        let generation = self.current()?.generation.id;
        if manifest.generation() != generation {
            return Err(StoreError::SnapshotUnavailable(format!(
                "it names generation {} of the store, which is at generation {generation}",
                manifest.generation()
            )));
        }
        let pin = Pin::of(manifest)?;
        *self.inner.pin.lock().map_err(lock_err)? = Some(pin);
        Ok(())
    }

    /// Streams the snapshot `manifest` names into `w` (the format of [`crate::snapshot_file`]): its
    /// metadata, then every batch of each partition in `start_offset..end_offset` at its index, each
    /// verified before it is sent. Applies may continue meanwhile; they only add batches beyond those
    /// end offsets. Fails with [`StoreError::SnapshotUnavailable`] if the store no longer holds the
    /// batches (a newer snapshot was pinned and reclaim ran, or a snapshot was installed since).
    pub fn export_snapshot<W: Write>(
        &self,
        manifest: &SnapshotManifest,
        w: W,
    ) -> Result<(ExportSummary, W), StoreError> {
        let _reading = self.inner.export_guard.read().map_err(lock_err)?;
        let cur = self.current()?;
        if cur.generation.id != manifest.generation() {
            return Err(StoreError::SnapshotUnavailable(format!(
                "it names generation {} of the store, which is at generation {}",
                manifest.generation(),
                cur.generation.id
            )));
        }
        let header = SnapshotHeader::decode(manifest.header_bytes())?;
        let io_err = |e| StoreError::io("write snapshot", e);
        let mut fw = FrameWriter::new(w).map_err(io_err)?;
        fw.frame(FrameKind::Header, &[manifest.header_bytes()]).map_err(io_err)?;
        let mut batches = 0u64;
        for (topic_id, partition, state) in &header.partitions {
            let (topic_id, partition) = (*topic_id, *partition);
            // From the start offset: batches below it (retention) may still be on disk, unreclaimed.
            let range =
                batch::key(topic_id, partition, state.start_offset)..batch::key(topic_id, partition, state.end_offset);
            // The batches must cover start..end exactly: a batch deleted since (the manifest is no
            // longer pinned) would be a hole, and a follower must never install one.
            let mut next = state.start_offset;
            for kv in cur.generation.records.range(range) {
                let (k, _) = kv?;
                let what = || format!("batch {topic_id}/{partition} key {k:?}");
                let (mut stored, mut records) = {
                    // The reference as it is now, read while no replaced tail version is released
                    // (the one the scan found may have been replaced since).
                    let _stable = self.inner.relocation.read().map_err(lock_err)?;
                    let Some(v) = cur.generation.records.get(&k)? else {
                        return Err(missing_from_snapshot(topic_id, partition, next));
                    };
                    let stored = self.inner.files.read(&what, &BatchRef::decode(&what, &v)?)?;
                    // Verify before shipping: a corrupt batch must stop the snapshot, not spread.
                    let records = batch::decode(&what, &stored)?;
                    (stored, records)
                };
                let base = batch::parse_key(&k).map(|(_, _, base)| base);
                if base != Some(next) {
                    return Err(missing_from_snapshot(topic_id, partition, next));
                }
                let wanted = state.end_offset - next;
                if records.len() as u64 > wanted {
                    // The partition's last batch, merged into since the snapshot: cut back to what
                    // it held then, so the snapshot is the state at its index exactly.
                    // Each record's encoding stands alone, so in the batch's own encoding the
                    // cut is byte for byte the batch as it was then.
                    records.truncate(usize::try_from(wanted).unwrap_or(usize::MAX));
                    stored = batch::encode(&records, batch::header(&what, &stored)?.encoding)?;
                }
                next += records.len() as u64;
                fw.frame(FrameKind::Batch, &[&k, &stored]).map_err(io_err)?;
                batches += 1;
            }
            if next < state.end_offset {
                return Err(missing_from_snapshot(topic_id, partition, next));
            }
        }
        fw.frame(FrameKind::End, &[&batches.to_le_bytes()]).map_err(io_err)?;
        let bytes = fw.bytes;
        Ok((ExportSummary { batches, bytes }, fw.into_inner()))
    }

    /// Replaces the whole store with the snapshot stream read from `r`, atomically: the snapshot is
    /// written into a fresh generation of trees, made durable, and only then made current. A snapshot
    /// that fails its checks leaves the store as it was. Returns the installed snapshot as a
    /// manifest of this store, pinned.
    pub fn import_snapshot<R: Read>(&self, r: R, what: &str) -> Result<SnapshotManifest, StoreError> {
        let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
        let old = self.current()?;
        // Into the old generation: if this install fails, the store stays as it was, whole.
        self.inner.commit_deferred(&old.generation)?;
        let new_id = old.generation.id + 1;
        let (m, rec) = tree_names(new_id);
        self.inner.db.drop_tree(m.as_bytes())?;
        self.inner.db.drop_tree(rec.as_bytes())?;
        let gen = open_generation(&self.inner.db, new_id)?;
        let files = &self.inner.files;
        files.drop_generation(new_id)?;
        let filled = fill_generation(&gen, files, r, what);
        let loaded = filled.and_then(|header| {
            let manifest = SnapshotManifest::new(new_id, &header)?;
            let pin = Pin::of(&manifest)?;
            let state = (load_meta(&gen.meta_tree)?, (load_producers(&gen.meta_tree)?, load_groups(&gen.meta_tree)?));
            Ok((manifest, pin, state))
        });
        let (manifest, pin, (meta, (producers, groups))) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                let _ = self.inner.db.drop_tree(m.as_bytes());
                let _ = self.inner.db.drop_tree(rec.as_bytes());
                let _ = files.drop_generation(new_id);
                return Err(e);
            }
        };
        self.sync_committed()?;
        self.inner.db.insert(GENERATION_KEY, checked::seal_bincode("generation", &new_id)?)?;
        self.sync_committed()?;
        *self.inner.uncommitted_refs.write().map_err(lock_err)? =
            UncommittedRefs { generation: new_id, refs: BTreeMap::new() };
        *self.inner.current.write().map_err(lock_err)? = Current { generation: gen, meta: Arc::new(meta) };
        *self.inner.producers.lock().map_err(lock_err)? = ProducerTable::new(producers);
        *self.inner.groups.write().map_err(lock_err)? = groups;
        *self.inner.pin.lock().map_err(lock_err)? = Some(pin);
        self.inner.retired.lock().map_err(lock_err)?.push(old.generation.id);
        Ok(manifest)
    }

    /// Physically deletes data nothing can reach any more: batches of deleted topics and below each
    /// partition's start offset (at most `max_keys` per call, so one call is bounded), and
    /// generations replaced by a snapshot install. Keeps what the pinned snapshot manifest names, and
    /// skips its turn while a snapshot export is reading. Returns how many keys it deleted.
    pub fn reclaim(&self, max_keys: usize) -> Result<usize, StoreError> {
        let _exclusive = match self.inner.export_guard.try_write() {
            Ok(g) => g,
            // Poisoned by a panic elsewhere: it only orders whole operations, nothing is half-done.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(0),
        };
        let retired: Vec<u64> = std::mem::take(&mut *self.inner.retired.lock().map_err(lock_err)?);
        for gen in retired {
            let gone = {
                // A reader may still be in the replaced generation (its trees and its files).
                let _no_readers = self.inner.relocation.write().map_err(lock_err)?;
                let (m, r) = tree_names(gen);
                self.inner.db.drop_tree(m.as_bytes())?;
                self.inner.db.drop_tree(r.as_bytes())?;
                self.inner.files.forget_generation(gen)?
            };
            self.inner.files.unlink_released(&gone)?;
        }
        // The state first, then the pin: a manifest captured after this read names nothing below the
        // start offsets read here, nor a topic already deleted here.
        let cur = self.current()?;
        let pin = self.inner.pin.lock().map_err(lock_err)?.clone().unwrap_or_default();
        let mut deleted = 0;
        // Whole deleted topics, then partition prefixes dropped by retention. Each marker is removed
        // once nothing it covers is left; one whose data the pinned snapshot still names stays, and
        // a later turn (after the next snapshot) finishes it.
        for kv in cur.generation.meta_tree.scan_prefix(b"reclaim/") {
            let (k, _) = kv?;
            let Some(id_bytes) = k.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()) else { continue };
            let topic_id = u32::from_be_bytes(id_bytes);
            if pin.holds_topic(topic_id) {
                continue;
            }
            let records = cur.generation.records.scan_prefix(topic_id.to_be_bytes());
            if !delete_bounded(&cur.generation.records, &self.inner, records, max_keys, &mut deleted)? {
                return Ok(deleted);
            }
            cur.generation.meta_tree.remove(&k)?;
        }
        for kv in cur.generation.meta_tree.scan_prefix(b"trim/") {
            let (k, _) = kv?;
            let (Some(t), Some(p)) = (k.get(5..9), k.get(9..13)) else { continue };
            let t = u32::from_be_bytes(t.try_into().unwrap_or_default());
            let p = u32::from_be_bytes(p.try_into().unwrap_or_default());
            // A deleted topic's partition is gone from the metadata: the topic's own reclaim covers it.
            if let Some(start) = cur.meta.partitions.get(&(t, p)).map(|s| s.start_offset) {
                let floor = pin.floor(t, p, start);
                let records = cur.generation.records.range(batch::key(t, p, 0)..batch::key(t, p, floor));
                if !delete_bounded(&cur.generation.records, &self.inner, records, max_keys, &mut deleted)? {
                    return Ok(deleted);
                }
                if floor < start {
                    continue;
                }
            }
            cur.generation.meta_tree.remove(&k)?;
        }
        Ok(deleted)
    }

    /// Where retention would move a partition's start offset now: past every whole batch older than
    /// `retention_ms` (by its newest record's timestamp, against `now_ms`) and past the oldest
    /// batches while the rest still holds `retention_bytes` or more. `None`: nothing to drop. Runs on
    /// the leader, whose clock decides; the result goes through the log.
    pub fn retention_point(
        &self,
        topic: &str,
        partition: u32,
        now_ms: i64,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let cur = self.current()?;
        let t = find_topic(&cur.meta, topic, partition)?;
        let st = cur.meta.partitions.get(&(t.id, partition)).copied().unwrap_or_default();
        let cutoff = retention_ms.map(|ms| now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
        let mut remaining = st.bytes;
        let mut new_start = st.start_offset;
        let (from, to) = (batch::key(t.id, partition, st.start_offset), batch::key(t.id, partition, st.end_offset));
        for kv in self.batch_refs(&cur, from, to)? {
            let (k, v) = kv?;
            let Some((_, _, base)) = batch::parse_key(&k) else { break };
            let r = BatchRef::decode(&|| format!("batch {topic}/{partition}@{base}"), &v)?;
            let expired = cutoff.is_some_and(|c| r.max_ts < c);
            // Kafka's rule: drop the oldest while what stays is still at least the limit, so a
            // partition holds at most retention.bytes plus one batch.
            let oversize = retention_bytes.is_some_and(|limit| remaining.saturating_sub(u64::from(r.len)) >= limit);
            if !(expired || oversize) {
                break;
            }
            remaining = remaining.saturating_sub(u64::from(r.len));
            new_start = base + u64::from(r.count);
        }
        Ok((new_start > st.start_offset).then_some(new_start))
    }

    /// Number of topics whose data is still waiting for [`TopicStore::reclaim`].
    pub fn pending_reclaim(&self) -> Result<usize, StoreError> {
        Ok(self.current()?.generation.meta_tree.scan_prefix(b"reclaim/").count())
    }

    /// Committed group offsets that retention moved up to a partition's new start since this
    /// process started.
    pub fn group_offsets_moved_by_retention(&self) -> u64 {
        self.inner.group_offsets_moved.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Names of every consumer group.
    pub fn group_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.inner.groups.read().map_err(lock_err)?.keys().cloned().collect())
    }

    /// A consumer group with names resolved and offsets, or `None` if it does not exist.
    pub fn group(&self, name: &str) -> Result<Option<GroupView>, StoreError> {
        let cur = self.current()?;
        let groups = self.inner.groups.read().map_err(lock_err)?;
        let Some(g) = groups.get(name) else { return Ok(None) };
        let names: HashMap<u32, &TopicName> = cur.meta.topics.values().map(|t| (t.id, &t.name)).collect();
        let named = |tps: &BTreeSet<(u32, u32)>| -> Vec<(String, u32)> {
            tps.iter().filter_map(|(t, p)| names.get(t).map(|n| (n.to_string(), *p))).collect()
        };
        let mut owner: HashMap<(u32, u32), &str> = HashMap::new();
        for (id, m) in &g.members {
            for tp in m.assigned.iter().chain(m.revoking.iter()) {
                owner.insert(*tp, id.as_str());
            }
        }
        let mut tps: BTreeSet<(u32, u32)> = g.committed.keys().copied().collect();
        for m in g.members.values() {
            for t in &m.topics {
                if let Some(meta) = cur.meta.topics.get(t) {
                    tps.extend((0..meta.partitions).map(|p| (meta.id, p)));
                }
            }
        }
        let partitions = tps
            .into_iter()
            .filter_map(|tp| {
                let topic = names.get(&tp.0)?.to_string();
                let st = cur.meta.partitions.get(&tp).copied().unwrap_or_default();
                Some(GroupPartitionView {
                    topic,
                    partition: tp.1,
                    committed: g.committed.get(&tp).copied(),
                    start_offset: st.start_offset,
                    end_offset: st.end_offset,
                    owner: owner.get(&tp).map(|s| s.to_string()),
                })
            })
            .collect();
        Ok(Some(GroupView {
            name: name.to_string(),
            generation: g.generation,
            rebalancing: g.is_rebalancing(),
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberView {
                    id: id.clone(),
                    topics: m.topics.iter().map(|t| t.to_string()).collect(),
                    session_timeout_ms: m.session_timeout_ms,
                    assigned: named(&m.assigned),
                    revoking: named(&m.revoking),
                })
                .collect(),
            partitions,
        }))
    }

    /// Every member of every group with its session timeout: what the coordinator watches.
    pub fn group_members(&self) -> Result<Vec<(String, String, u32)>, StoreError> {
        let groups = self.inner.groups.read().map_err(lock_err)?;
        Ok(groups
            .iter()
            .flat_map(|(g, st)| st.members.iter().map(move |(m, ms)| (g.clone(), m.clone(), ms.session_timeout_ms)))
            .collect())
    }

    /// Groups in the middle of a cooperative rebalance: (group, generation, members that must
    /// acknowledge a revocation).
    pub fn rebalancing_groups(&self) -> Result<Vec<(String, u64, Vec<String>)>, StoreError> {
        let groups = self.inner.groups.read().map_err(lock_err)?;
        Ok(groups
            .iter()
            .filter(|(_, g)| g.is_rebalancing())
            .map(|(name, g)| {
                let revokers =
                    g.members.iter().filter(|(_, m)| !m.revoking.is_empty()).map(|(id, _)| id.clone()).collect();
                (name.clone(), g.generation, revokers)
            })
            .collect())
    }

    /// Frees the dead bytes of sparse batch files: the live batches of the closed files
    /// [`files_to_compact`] chooses (emptiest first, up to `max_move_bytes` of live batches, at least
    /// one file; at most `COMPACT_MAX_BATCHES` batches) are copied into the compaction lane's file,
    /// their references pointed at the copies, and the old files unlinked. Without it, one batch of a
    /// long-retained topic keeps a whole file of a short-retained one on disk.
    ///
    /// Order, for power loss: the copies are fdatasynced before any reference to them is written;
    /// the new references are durable (sled flushed, with the batch files' sync mark) before the old
    /// files are released. A crash before that leaves the copies unreferenced (unlinked at open); a
    /// crash after leaves the old files unreferenced (the same).
    ///
    /// Every batch is checked (both crcs) before it is copied. A damaged one is logged and its file
    /// left alone, for readers to report, and skipped by later rounds until the store is reopened;
    /// the other files of the round are still compacted.
    ///
    /// Copies while everything else runs. Then, with reclaim and exports held off (waiting up to
    /// `COMPACT_SWAP_WAIT` for an export to finish, else giving the round up) and apply held off for
    /// the swap itself, replaces every reference that did not change meanwhile (reclaim may have
    /// deleted some), and releases the old ones once no reader can be holding them.
    pub fn compact(&self, max_move_bytes: u64) -> Result<CompactionSummary, StoreError> {
        let mut cursor = self.inner.compacting.lock().map_err(lock_err)?;
        if matches!(self.inner.export_guard.try_write(), Err(TryLockError::WouldBlock)) {
            // A snapshot streams to a follower (up to minutes): copying now would likely be for
            // nothing, as the swap waits for it only `COMPACT_SWAP_WAIT`.
            return Ok(CompactionSummary::default());
        }
        let files = &self.inner.files;
        // The files are chosen by their live counts, which apply keeps whether or not its references
        // are in sled yet: an idle node's round ends here without a transaction.
        let generation = self.current()?.generation.id;
        let mut chosen = {
            let unmovable = self.inner.unmovable.lock().map_err(lock_err)?;
            files_to_compact(files.usage(generation)?, &unmovable, max_move_bytes)
        };
        if chosen.is_empty() {
            return Ok(CompactionSummary::default());
        }
        // Every reference into a closed file is in sled from here on: apply adds references only to
        // its active file, and a closed file never becomes active again. (The one such reference
        // apply may still replace, a partition's last batch it merges into, the swap checks.)
        let cur = {
            let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
            let cur = self.current()?;
            self.inner.commit_deferred(&cur.generation)?;
            cur
        };
        if cur.generation.id != generation {
            // A snapshot was installed meanwhile; the next round looks at its files.
            return Ok(CompactionSummary::default());
        }
        let mut moves: Vec<Move> = Vec::new();
        let more = match self.copy_live_batches(&cur, &mut cursor, &mut chosen, &mut moves) {
            Ok(more) => more,
            Err(e) => {
                self.forget_copies(&moves);
                return Err(e);
            }
        };
        if moves.is_empty() {
            return Ok(CompactionSummary { more, ..CompactionSummary::default() });
        }
        #[cfg(test)]
        if *self.inner.compaction_crash.lock().map_err(lock_err)? == Some(CompactionStep::Copied) {
            return Ok(CompactionSummary::default());
        }
        // Reclaim (which deletes references) and exports (which stream references read earlier)
        // stay out from here until the old files are released.
        let Some(_exclusive) = self.hold_off_reclaim_and_exports(COMPACT_SWAP_WAIT)? else {
            self.forget_copies(&moves);
            // This stretch of references is looked at again next round.
            if let Some(first) = moves.first() {
                cursor.rewind(generation, first.key.clone());
            }
            return Ok(CompactionSummary::default());
        };
        // In chunks, each under the apply lock, so apply is held up for a few thousand keys at a
        // time, not a whole round. A failed chunk forgets its copies and those not swapped yet;
        // the ones swapped before keep their (correct) references and are released below like a
        // whole round's, and the error is returned after that.
        let mut swapped: Vec<Move> = Vec::with_capacity(moves.len());
        let mut failed: Option<StoreError> = None;
        let mut pending = moves.into_iter().peekable();
        while pending.peek().is_some() {
            let chunk: Vec<Move> = pending.by_ref().take(COMPACT_SWAP_CHUNK).collect();
            let first_key = chunk.first().map(|m| m.key.clone());
            #[cfg(test)]
            let outcome = if !swapped.is_empty()
                && *self.inner.compaction_crash.lock().map_err(lock_err)? == Some(CompactionStep::LaterChunkFails)
            {
                self.forget_copies(&chunk);
                Err(StoreError::io("injected swap failure", std::io::Error::other("test")))
            } else {
                self.swap_references(generation, chunk)
            };
            #[cfg(not(test))]
            let outcome = self.swap_references(generation, chunk);
            match outcome {
                Ok(Some(done)) => swapped.extend(done),
                Ok(None) => {
                    // An install replaced the generation: its files go with it.
                    self.forget_copies(&pending.collect::<Vec<_>>());
                    if !swapped.is_empty() {
                        self.sync_committed()?;
                    }
                    return Ok(CompactionSummary::default());
                }
                Err(e) => {
                    if let Some(key) = first_key {
                        // What was not swapped is looked at again next round.
                        cursor.rewind(generation, key);
                    }
                    self.forget_copies(&pending.collect::<Vec<_>>());
                    failed = Some(e);
                    break;
                }
            }
        }
        if swapped.is_empty() {
            return failed.map_or(Ok(CompactionSummary::default()), Err);
        }
        // The new references durable before the old files go: after a power loss sled must not
        // name a file that was unlinked.
        self.sync_committed()?;
        #[cfg(test)]
        if *self.inner.compaction_crash.lock().map_err(lock_err)? == Some(CompactionStep::Swapped) {
            return Ok(CompactionSummary::default());
        }
        // Readers that come later find the new references.
        let emptied = self.inner.release_published(swapped.iter().map(|m| &m.old))?;
        let mut summary = CompactionSummary {
            more,
            batches: swapped.len() as u64,
            moved_bytes: swapped.iter().map(|m| u64::from(m.new.len)).sum(),
            ..CompactionSummary::default()
        };
        for seq in &emptied {
            if let Some(f) = chosen.get(seq) {
                summary.files += 1;
                summary.freed_bytes += f.len;
            }
        }
        let mut totals = self.inner.compacted.lock().map_err(lock_err)?;
        totals.files += summary.files;
        totals.freed_bytes += summary.freed_bytes;
        totals.batches += summary.batches;
        totals.moved_bytes += summary.moved_bytes;
        failed.map_or(Ok(summary), Err)
    }

    /// Gives back the copies of `moves` that no reference names (a round given up, or its swap
    /// failed): their file goes once nothing in it is referenced. Best effort: a count left high
    /// only keeps a file until the next open.
    fn forget_copies(&self, moves: &[Move]) {
        for m in moves {
            let _ = self.inner.files.release(&m.new);
        }
    }

    /// Points the references of `chunk` at their copies, those that did not change since they were
    /// copied (reclaim may have deleted some), in one sled batch under the apply lock; forgets the
    /// other copies. Returns the moves swapped, or `None` (every copy forgotten) if an install
    /// replaced `generation` meanwhile. On an error every copy of the chunk is forgotten.
    fn swap_references(&self, generation: u64, chunk: Vec<Move>) -> Result<Option<Vec<Move>>, StoreError> {
        let files = &self.inner.files;
        let _apply = match self.inner.apply_lock.lock() {
            Ok(g) => g,
            Err(_) => {
                self.forget_copies(&chunk);
                return Err(lock_err(()));
            }
        };
        let result = (|| -> Result<Option<Vec<bool>>, StoreError> {
            let now = self.current()?;
            if now.generation.id != generation {
                // An install replaced the generation; its files go with it.
                return Ok(None);
            }
            let mut swap = sled::Batch::default();
            let mut unchanged = Vec::with_capacity(chunk.len());
            let uncommitted = self.inner.uncommitted_refs.read().map_err(lock_err)?;
            for m in &chunk {
                // Reclaim may have deleted this one while we copied, or apply merged into it (a
                // partition's last batch; see `TAIL_MERGE_BYTES`), perhaps not in sled yet.
                let same = now.generation.records.get(&m.key)?.as_ref() == Some(&m.old_value)
                    && !uncommitted.refs.contains_key(&m.key);
                if same {
                    swap.insert(m.key.clone(), m.new.encode()?);
                }
                unchanged.push(same);
            }
            now.generation.records.apply_batch(swap)?;
            Ok(Some(unchanged))
        })();
        match result {
            Ok(Some(unchanged)) => {
                let mut done = Vec::with_capacity(chunk.len());
                for (m, same) in chunk.into_iter().zip(unchanged) {
                    if same {
                        done.push(m);
                    } else {
                        let _ = files.release(&m.new);
                    }
                }
                Ok(Some(done))
            }
            Ok(None) => {
                self.forget_copies(&chunk);
                Ok(None)
            }
            Err(e) => {
                self.forget_copies(&chunk);
                Err(e)
            }
        }
    }

    /// Copies every batch that a committed reference names in a `chosen` file into the compaction
    /// lane, checked first, and fdatasyncs the copies. Looks at the references from `cursor` on, at
    /// most `compact_scan_refs` of them (a round's scan is bounded however large the store), and
    /// once the copies are synced leaves `cursor` where the next round goes on; `true`: the pass
    /// over the references is not done (see [`CompactionSummary::more`]). A file holding a damaged
    /// batch leaves `chosen` (and its copies are forgotten) and is remembered as unmovable.
    fn copy_live_batches(
        &self,
        cur: &Current,
        cursor: &mut ScanCursor,
        chosen: &mut BTreeMap<u64, FileUse>,
        moves: &mut Vec<Move>,
    ) -> Result<bool, StoreError> {
        let files = &self.inner.files;
        let start = cursor.start(cur.generation.id);
        let from_first = start.is_empty();
        let mut stopped_at = None;
        for (scanned, kv) in cur.generation.records.range(start..).enumerate() {
            let (key, old_value) = kv?;
            if scanned >= self.inner.compact_scan_refs {
                stopped_at = Some(key);
                break;
            }
            let what = || format!("batch key {key:?} (compaction)");
            // One that does not decode is left where it is, for a reader to report.
            let Ok(old) = BatchRef::decode(&what, &old_value) else { continue };
            if !chosen.contains_key(&old.file) {
                continue;
            }
            if moves.len() >= COMPACT_MAX_BATCHES {
                // Bounded memory per round; the next round goes on from this one.
                stopped_at = Some(key);
                break;
            }
            let checked = files.read(&what, &old).and_then(|stored| match checked::open(&what, &stored) {
                Ok(_) => Ok(stored),
                Err(e) => Err(e),
            });
            let stored = match checked {
                Ok(stored) => stored,
                Err(_) if self.current()?.generation.id != cur.generation.id => {
                    // An install replaced this generation and reclaim dropped its files: nothing
                    // is damaged, the round is moot (the swap gives it up).
                    break;
                }
                Err(_) if cur.generation.records.get(&key)?.as_ref() != Some(&old_value) => {
                    // Reclaim deleted it (and perhaps its file) since the scan found it: nothing
                    // to copy, nothing damaged.
                    continue;
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        file = format!("{:016x}", old.file),
                        "a batch in a batch file is damaged: the file is not compacted"
                    );
                    chosen.remove(&old.file);
                    self.inner.unmovable.lock().map_err(lock_err)?.insert(old.file);
                    moves.retain(|m| {
                        let keep = m.old.file != old.file;
                        if !keep {
                            let _ = files.release(&m.new);
                        }
                        keep
                    });
                    continue;
                }
            };
            let new = files.store_in(Lane::Compaction, cur.generation.id, &what, &stored)?;
            moves.push(Move { key, old_value, old, new });
        }
        // The copies reach the disk before a reference to them can (sled flushes on its own). Under
        // `flushing`: a concurrent flush must not record these files as synced while the fdatasyncs
        // still run.
        {
            let _flush = self.inner.flushing.lock().map_err(lock_err)?;
            files.sync()?;
        }
        // Moved on only now: a round that fails before here looks at the same stretch again.
        let pass_moved = !moves.is_empty() || (!from_first && cursor.pass_moved);
        // The pass goes on (it stopped before the last reference), or one that moved batches ended
        // past the first (another pass from the first may find what this one freed up): soon.
        let more = pass_moved && (stopped_at.is_some() || !from_first);
        *cursor = ScanCursor { generation: cur.generation.id, next: stopped_at, pass_moved };
        Ok(more)
    }

    /// The export guard, exclusively: waits up to `wait` for a running export to finish. `None`: it
    /// did not. A guard poisoned by a panic elsewhere still excludes (nothing it guards is left
    /// half-done by a panic: the guard only orders whole operations).
    fn hold_off_reclaim_and_exports(&self, wait: Duration) -> Result<Option<RwLockWriteGuard<'_, ()>>, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.inner.export_guard.try_write() {
                Ok(g) => return Ok(Some(g)),
                Err(TryLockError::Poisoned(p)) => return Ok(Some(p.into_inner())),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
            }
        }
    }

    /// What [`compact`](Self::compact) did since the store was opened.
    pub fn compaction_totals(&self) -> Result<CompactionSummary, StoreError> {
        Ok(*self.inner.compacted.lock().map_err(lock_err)?)
    }

    /// Bytes of the batch files, and how many of them references name (the rest is dead space,
    /// which compaction gives back once a file is mostly dead).
    pub fn batch_file_bytes(&self) -> Result<(u64, u64), StoreError> {
        Ok((self.inner.files.size()?, self.inner.files.live_bytes()?))
    }

    /// Bytes sled's files and the batch files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()? + self.inner.files.size()?)
    }
}

/// Batch files in which at most this share of the bytes is still referenced are always compacted
/// ([`TopicStore::compact`]): a live byte is copied at most once per dead byte freed.
pub const COMPACT_MAX_LIVE_PERCENT: u64 = 50;

/// A generation's batch files hold at most this share of their live bytes: beyond it, files more
/// than half live are compacted too, emptiest first, until the files are back under it (but only
/// files at most 100/140 live, so that no byte freed costs more than about 2.5 copied). Without it,
/// files each just over [`COMPACT_MAX_LIVE_PERCENT`] live would keep twice the live data. The disk
/// goal (docs/benchmarks.md) is 1.5× the payload; 1.4× leaves room for the record encoding and
/// sled's index (3% at 1 KiB records).
pub const COMPACT_MAX_SPACE_PERCENT: u64 = 140;

/// Which of the closed files of `usage` (emptiest first) a compaction round empties: every file at
/// most [`COMPACT_MAX_LIVE_PERCENT`] live, then, while the generation's files hold more than
/// [`COMPACT_MAX_SPACE_PERCENT`] of their live bytes (counting each chosen file as replaced by a copy
/// of its live bytes), the next emptiest that are at most 100/140 (71%) live: no file costs more
/// than 2.5 bytes copied per byte freed, even when dead bytes compaction cannot free (in the files
/// being filled, or in `unmovable` ones) keep the generation over the target. Files in `unmovable`
/// are left alone, and the live bytes chosen stay within `max_move_bytes` (but at least one file is
/// chosen).
fn files_to_compact(usage: GenerationUse, unmovable: &BTreeSet<u64>, max_move_bytes: u64) -> BTreeMap<u64, FileUse> {
    let (mut held, live) = (u128::from(usage.held), u128::from(usage.live));
    let mut chosen = BTreeMap::new();
    let mut budget = 0u64;
    for f in usage.closed {
        let (len, live_bytes) = (u128::from(f.len), u128::from(f.live_bytes));
        let sparse = live_bytes * 100 <= len * u128::from(COMPACT_MAX_LIVE_PERCENT);
        let worth = live_bytes * u128::from(COMPACT_MAX_SPACE_PERCENT) <= len * 100;
        let over_target = held * 100 > live * u128::from(COMPACT_MAX_SPACE_PERCENT);
        if !(sparse || (worth && over_target)) {
            // Emptiest first: no later file is sparse or worth copying.
            break;
        }
        if unmovable.contains(&f.seq) {
            continue;
        }
        if !chosen.is_empty() && budget.saturating_add(f.live_bytes) > max_move_bytes {
            break;
        }
        budget += f.live_bytes;
        held = held.saturating_sub(u128::from(f.len.saturating_sub(f.live_bytes)));
        chosen.insert(f.seq, f);
    }
    chosen
}

/// References one compaction round looks at, at most (the default of
/// [`TopicStoreOptions::compact_scan_refs`]): about a second of one core. A store of one small batch
/// per record (one-record requests at a low rate) can hold hundreds of millions; a round then covers
/// a stretch of them, and the next goes on from there.
pub const COMPACT_SCAN_REFS: usize = 1 << 20;

/// Where the next compaction round starts looking at the references of `generation`: `None`, or
/// another generation, from the first.
#[derive(Debug, Default)]
struct ScanCursor {
    generation: u64,
    next: Option<sled::IVec>,
    /// The pass over the references that `next` is in (from the first to the last) has copied
    /// something: only then does the next round come soon. A pass that finds nothing to move (a
    /// chosen file whose count stays high, say after a failed swap) is not repeated back to back.
    pass_moved: bool,
}

impl ScanCursor {
    fn start(&self, generation: u64) -> sled::IVec {
        match &self.next {
            Some(k) if self.generation == generation => k.clone(),
            _ => sled::IVec::from(&[][..]),
        }
    }

    /// Back to `key` (the first of the copies a round gave up before their swap), unless the next
    /// round starts before it anyway (`None`: from the first reference).
    fn rewind(&mut self, generation: u64, key: sled::IVec) {
        if self.generation == generation && self.next.as_ref().is_none_or(|k| *k <= key) {
            return;
        }
        self.generation = generation;
        self.next = Some(key);
    }
}

/// Batches one compaction round moves at most (it keeps a few hundred bytes per batch in memory
/// until the swap). A file of tiny batches takes several rounds.
const COMPACT_MAX_BATCHES: usize = 65_536;

/// Where a test makes a compaction round stop as if the process died there.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CompactionStep {
    /// The copies written and synced, no reference to them yet.
    Copied,
    /// The references swapped and durable, the old files not released yet.
    Swapped,
    /// Not a crash: every swap chunk after the first fails (an I/O error).
    LaterChunkFails,
}

/// References one compaction swap changes under the apply lock. Tests use small chunks, so their
/// rounds take several.
#[cfg(not(test))]
const COMPACT_SWAP_CHUNK: usize = 4096;
#[cfg(test)]
const COMPACT_SWAP_CHUNK: usize = 8;

/// How long a compaction round waits for a running snapshot export before it gives up its copies.
const COMPACT_SWAP_WAIT: Duration = Duration::from_secs(5);

/// One batch a compaction round copied: its key, the reference it replaces (as stored, to check it
/// did not change meanwhile), and the copy's.
struct Move {
    key: sled::IVec,
    old_value: sled::IVec,
    old: BatchRef,
    new: BatchRef,
}

/// What one [`TopicStore::compact`] round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactionSummary {
    /// Call again soon: the round's pass over the references has moved batches and is not done (it
    /// stopped before the last reference, at [`TopicStoreOptions::compact_scan_refs`] or its limit
    /// on batches moved; the next round goes on from there), or it ended after beginning past the
    /// first (the next round starts a new pass). Always `false` in
    /// [`TopicStore::compaction_totals`].
    pub more: bool,
    /// Batch files emptied and unlinked, and their bytes.
    pub files: usize,
    pub freed_bytes: u64,
    /// Batches copied into the compaction lane's file, and their bytes.
    pub batches: u64,
    pub moved_bytes: u64,
}

/// Deletes the keys `records` yields, until `*deleted` reaches `max_keys`. Returns whether it got
/// through all of them (false: the budget ran out first).
fn delete_bounded(
    tree: &sled::Tree,
    store: &Inner,
    records: sled::Iter,
    max_keys: usize,
    deleted: &mut usize,
) -> Result<bool, StoreError> {
    let mut batch = sled::Batch::default();
    let mut released = Vec::new();
    let mut exhausted = true;
    for kv in records {
        if *deleted >= max_keys {
            exhausted = false;
            break;
        }
        let (k, v) = kv?;
        // A reference that does not decode still goes; it names nothing we could release.
        if let Ok(r) = BatchRef::decode(&|| "batch reference".into(), &v) {
            released.push(r);
        }
        batch.remove(k);
        *deleted += 1;
    }
    tree.apply_batch(batch)?;
    // Only after the references are gone: a file is unlinked once nothing names it, and no reader
    // that found one of them before (a fetch that began before a deletion or retention cut) is
    // still between finding it and reading it.
    if !released.is_empty() {
        store.release_published(released.iter())?;
    }
    Ok(exhausted)
}

/// Converts a store of an earlier release, whose records tree held the stored batches themselves:
/// each batch is checked, appended to a batch file and replaced by its reference; then everything is
/// made durable and the layout key written. Chunks of references commit together with the last key
/// converted (`layout_progress` in the meta tree), so a crash midway resumes after it.
fn move_batches_to_files(db: &sled::Db, generation: &Generation, files: &BatchFiles) -> Result<(), StoreError> {
    const PROGRESS_KEY: &[u8] = b"layout_progress";
    let commit = |refs: &sled::Batch, last: &[u8]| -> Result<(), StoreError> {
        files.sync()?;
        let progress = checked::seal(last);
        (&generation.meta_tree, &generation.records)
            .transaction(|(m, r)| {
                r.apply_batch(refs)?;
                m.insert(PROGRESS_KEY, progress.clone())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => StoreError::corrupt("layout conversion", "transaction aborted"),
            })
    };
    let after = match generation.meta_tree.get(PROGRESS_KEY)? {
        Some(v) => checked::open(&|| "layout progress".into(), &v)?.to_vec(),
        None => Vec::new(),
    };
    let mut moved = 0u64;
    let mut refs = sled::Batch::default();
    let mut pending = 0;
    let mut last = after.clone();
    for kv in generation.records.range(after.clone()..) {
        let (k, v) = kv?;
        if !after.is_empty() && *k == *after {
            continue;
        }
        let what = || format!("batch key {k:?} of an earlier release");
        // Already a reference (a conversion cut short in a way the progress key does not cover):
        // leave it. An old batch that happens to decode as one names no batch file that exists.
        if let Ok(r) = BatchRef::decode(&what, &v) {
            if v.len() == 40 && files.file_len(r.file)?.is_some_and(|len| len >= r.end()) {
                continue;
            }
        }
        batch::decode(&what, &v)?;
        refs.insert(k.clone(), files.store(generation.id, &what, &v)?.encode()?);
        last = k.to_vec();
        moved += 1;
        pending += 1;
        if pending >= 1024 {
            commit(&std::mem::take(&mut refs), &last)?;
            pending = 0;
        }
    }
    commit(&refs, &last)?;
    // The layout key before the progress key goes: a crash between them must not restart the
    // conversion over values that are references already.
    db.insert(LAYOUT_KEY, checked::seal_bincode("layout", &LAYOUT_BATCH_FILES)?)?;
    db.flush()?;
    generation.meta_tree.remove(PROGRESS_KEY)?;
    tracing::info!(batches = moved, "moved stored batches from sled to batch files");
    Ok(())
}

/// Counts the references of `generation` per batch file (so files are unlinked when their last
/// batch goes) and checks the ones a reader could reach: their file must exist, and one beyond
/// what `synced` says was synced must read back whole. Returns why the store is unusable, if it is.
fn count_references(
    generation: &Generation,
    meta: &Meta,
    files: &BatchFiles,
    synced: &BTreeMap<u64, u64>,
) -> Result<Option<String>, StoreError> {
    let live_topics: BTreeSet<u32> = meta.topics.values().map(|t| t.id).collect();
    let mut lost = None;
    for kv in generation.records.iter() {
        let (k, v) = kv?;
        let reachable = match batch::parse_key(&k) {
            Some((t, p, base)) => {
                live_topics.contains(&t)
                    && meta.partitions.get(&(t, p)).is_some_and(|s| base >= s.start_offset && base < s.end_offset)
            }
            None => true,
        };
        let what = || format!("batch key {k:?}");
        let r = match BatchRef::decode(&what, &v) {
            Ok(r) => r,
            Err(e) => {
                if reachable {
                    lost.get_or_insert_with(|| e.to_string());
                }
                continue;
            }
        };
        files.reserve_numbers_through(r.file)?;
        if files.file_len(r.file)?.is_none() {
            if reachable {
                lost.get_or_insert_with(|| format!("{}: its file {:016x} is missing", what(), r.file));
            }
            continue;
        }
        files.retain(&r, generation.id)?;
        if reachable && synced.get(&r.file).is_none_or(|len| *len < r.end()) {
            if let Err(e) = files.read(&what, &r).and_then(|stored| checked::open(&what, &stored).map(drop)) {
                lost.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Ok(lost)
}

fn missing_from_snapshot(topic_id: u32, partition: u32, offset: u64) -> StoreError {
    StoreError::SnapshotUnavailable(format!("partition {topic_id}/{partition} no longer holds offset {offset}"))
}

fn missing_batch(topic: &str, partition: u32, offset: u64) -> StoreError {
    StoreError::corrupt(
        format!("{topic}/{partition}"),
        format!("no batch holds offset {offset} although it is in range"),
    )
}

fn find_topic<'a>(meta: &'a Meta, topic: &str, partition: u32) -> Result<&'a TopicMeta, StoreError> {
    let unknown = || StoreError::UnknownTopicOrPartition { topic: topic.to_string(), partition };
    let t = TopicName::new(topic).ok().and_then(|n| meta.topics.get(&n)).ok_or_else(unknown)?;
    if partition >= t.partitions {
        return Err(unknown());
    }
    Ok(t)
}

fn open_generation(db: &sled::Db, id: u64) -> Result<Generation, StoreError> {
    let (m, r) = tree_names(id);
    Ok(Generation { id, meta_tree: db.open_tree(m)?, records: db.open_tree(r)? })
}

fn load_meta(tree: &sled::Tree) -> Result<Meta, StoreError> {
    let mut meta = Meta::default();
    if let Some(v) = tree.get(APPLIED_KEY)? {
        meta.applied = Some(Bytes::copy_from_slice(checked::open(&|| "applied position".into(), &v)?));
    }
    if let Some(v) = tree.get(NEXT_TOPIC_ID_KEY)? {
        meta.next_topic_id = checked::open_bincode(&|| "next topic id".into(), &v)?;
    }
    meta.next_producer_id = match tree.get(NEXT_PRODUCER_ID_KEY)? {
        Some(v) => checked::open_bincode(&|| "next producer id".into(), &v)?,
        None => FIRST_PRODUCER_ID,
    };
    meta.apply_version = match tree.get(APPLY_VERSION_KEY)? {
        Some(v) => checked::open_bincode(&|| "apply version".into(), &v)?,
        None => LEGACY_APPLY_VERSION,
    };
    for kv in tree.scan_prefix(b"t/") {
        let (k, v) = kv?;
        let t: TopicMeta = checked::open_bincode(&|| format!("topic {}", String::from_utf8_lossy(&k)), &v)?;
        meta.topics.insert(t.name.clone(), t);
    }
    for kv in tree.scan_prefix(b"p/") {
        let (k, v) = kv?;
        let (t, p) = match (k.get(2..6), k.get(6..10)) {
            (Some(t), Some(p)) => (
                u32::from_be_bytes(t.try_into().unwrap_or_default()),
                u32::from_be_bytes(p.try_into().unwrap_or_default()),
            ),
            _ => return Err(StoreError::corrupt("partition state key", format!("{k:?}"))),
        };
        let s: PartitionState = checked::open_bincode(&|| format!("partition state {t}/{p}"), &v)?;
        meta.partitions.insert((t, p), s);
    }
    Ok(meta)
}

fn load_groups(tree: &sled::Tree) -> Result<BTreeMap<String, GroupState>, StoreError> {
    let mut out = BTreeMap::new();
    for kv in tree.scan_prefix(b"grp/") {
        let (k, v) = kv?;
        let name = String::from_utf8_lossy(&k[4..]).to_string();
        let g: GroupState = checked::open_bincode(&|| format!("group {name}"), &v)?;
        out.insert(name, g);
    }
    Ok(out)
}

fn load_producers(tree: &sled::Tree) -> Result<HashMap<ProducerKey, ProducerState>, StoreError> {
    let mut out = HashMap::new();
    for kv in tree.scan_prefix(b"s/") {
        let (k, v) = kv?;
        let key = match (k.get(2..10), k.get(10..14), k.get(14..18)) {
            (Some(p), Some(t), Some(q)) => (
                u64::from_be_bytes(p.try_into().unwrap_or_default()),
                u32::from_be_bytes(t.try_into().unwrap_or_default()),
                u32::from_be_bytes(q.try_into().unwrap_or_default()),
            ),
            _ => return Err(StoreError::corrupt("producer state key", format!("{k:?}"))),
        };
        out.insert(key, producers::decode_stored(&|| format!("producer state {key:?}"), &v)?);
    }
    Ok(out)
}

pub(crate) fn rejected(code: ErrorCode, message: String) -> CommandResponse {
    CommandResponse::Rejected { code, message }
}

/// How many apply calls may share one sled transaction (see the module documentation): a crash
/// makes the log replay at most this many more calls' entries.
const MAX_DEFERRED_APPLIES: usize = 32;
/// And how many batch references may wait in memory for it.
const MAX_DEFERRED_REFS: usize = 4096;

/// Whether an apply of `cmd` may leave its writes for a later transaction: produces only. Anything
/// else reads sled for earlier batches, or changes what readers look for there, so it commits first.
fn defers_commit(cmd: &Command) -> bool {
    match cmd {
        Command::Produce { .. } => true,
        Command::Batch(cmds) => cmds.iter().all(|c| matches!(c, Command::Produce { .. })),
        _ => false,
    }
}

/// Writes to one tree, the last per key winning, applied to sled as one batch.
#[derive(Default)]
struct TreeWrites(BTreeMap<sled::IVec, Option<sled::IVec>>);

impl TreeWrites {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: Vec<u8>) {
        self.0.insert(key.as_ref().into(), Some(value.into()));
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.insert(key.as_ref().into(), None);
    }

    fn merge(&mut self, later: TreeWrites) {
        self.0.extend(later.0);
    }

    fn to_batch(&self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in &self.0 {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }
}

/// Apply calls whose writes are not in sled yet: the meta tree's (partition states, producer
/// states, the applied position), in apply order. Their batch references are in
/// [`UncommittedRefs`].
#[derive(Default)]
struct Deferred {
    meta: TreeWrites,
    applies: usize,
    /// One of them merged into a batch a pinned snapshot names (see [`Inner::commit_deferred`]).
    merged_tails: bool,
}

/// The references to batches stored by applies not committed to sled yet: key → [`BatchRef`], as
/// in the records tree of `generation`. Only ever newer batches than sled holds for a partition
/// (anything that removes references commits first).
struct UncommittedRefs {
    generation: u64,
    refs: BTreeMap<sled::IVec, sled::IVec>,
}

/// The batch references of a key range in key order: the union of those in sled and the
/// uncommitted ones. The uncommitted ones are copied *before* sled is read: a commit between the
/// two moves references into sled before it drops them from memory, so each reference is in one of
/// the two reads; one in both is yielded once.
struct MergedRefs {
    committed: std::iter::Peekable<sled::Iter>,
    uncommitted: std::iter::Peekable<std::vec::IntoIter<(sled::IVec, sled::IVec)>>,
}

impl Iterator for MergedRefs {
    type Item = Result<(sled::IVec, sled::IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let committed_key = match self.committed.peek() {
            Some(Ok((k, _))) => Some(k.clone()),
            Some(Err(_)) => return self.committed.next().map(|r| r.map_err(StoreError::from)),
            None => None,
        };
        let take_uncommitted = match (&committed_key, self.uncommitted.peek()) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(c), Some((u, _))) => {
                if u == c {
                    // Two versions of one key: a merged tail (see `TAIL_MERGE_BYTES`) newer in
                    // memory than in sled, or the same reference twice. Versions only grow: the
                    // one naming more records is the newer.
                    let count = |v: &sled::IVec| BatchRef::decode(&String::new, v).map_or(0, |r| r.count);
                    let (_, mine) = self.uncommitted.peek()?;
                    let newer_in_memory = match self.committed.peek() {
                        Some(Ok((_, theirs))) => count(mine) > count(theirs),
                        _ => false,
                    };
                    if newer_in_memory {
                        self.committed.next();
                    } else {
                        self.uncommitted.next();
                    }
                    newer_in_memory
                } else {
                    u < c
                }
            }
        };
        if take_uncommitted {
            self.uncommitted.next().map(Ok)
        } else {
            self.committed.next().map(|r| r.map_err(StoreError::from))
        }
    }
}

/// One apply call's working state: the new metadata, producer states it changed (`None`: removed),
/// and the sled writes, queued together at the end (see [`Deferred`]).
struct Work<'a> {
    meta: Meta,
    producers: &'a HashMap<ProducerKey, ProducerState>,
    /// The next producer stamp (see `producers`): taken from the table, written back after.
    producer_clock: u64,
    /// Producer states held counting this call's changes: `producers` with `touched` over it.
    producers_live: usize,
    touched: HashMap<ProducerKey, Option<ProducerState>>,
    /// The groups, copied on the first change (to write back), and which ones this apply changed.
    groups: Cow<'a, BTreeMap<String, GroupState>>,
    touched_groups: BTreeSet<String>,
    /// The records tree, read (never written) to size the batches retention drops.
    records_tree: sled::Tree,
    /// Where stored batches are written (at once: the references go in the transaction).
    files: &'a BatchFiles,
    generation: u64,
    /// Group offsets this apply moved up to a new start offset (see `group_offsets_moved`).
    group_offsets_moved: u64,
    meta_batch: TreeWrites,
    /// References to the batches this call stored, for the records tree (a merged tail's key may
    /// be stored more than once: the last version wins).
    records_batch: BTreeMap<sled::IVec, sled::IVec>,
    /// The references of earlier apply calls not in sled yet (read to find a partition's tail).
    uncommitted: &'a RwLock<UncommittedRefs>,
    /// Tail versions this call replaced (see [`TAIL_MERGE_BYTES`]).
    superseded: Vec<BatchRef>,
    /// What the store's snapshots name (see [`Inner::pin`]): a merge into a batch a pinned
    /// snapshot's export reads must be synced before its reference reaches sled.
    pin: &'a Mutex<Option<Pin>>,
    /// This call merged into such a batch.
    merged_pinned: bool,
    /// The batches written to `records_batch` by this apply call, (topic id, partition, base) →
    /// (record count, stored size): not in `records_tree` until the transaction commits, but a
    /// later command of the same call (a retention cut) must see them.
    staged: BTreeMap<(u32, u32, u64), (u64, u64)>,
    /// Records appended by this entry and not yet encoded, per (topic id, partition): the produce
    /// commands of one entry (a `Command::Batch` of many small requests) are stored as one batch
    /// per partition instead of one sled value each. See [`Work::produce`].
    pending: BTreeMap<(u32, u32), PendingBatch<'a>>,
}

/// Consecutive records of one partition, from the produce commands of one log entry, to be stored
/// as one batch.
struct PendingBatch<'a> {
    base: u64,
    /// The parts' one encoding: a part in another starts a new batch.
    encoding: RecordEncoding,
    parts: Vec<&'a RecordBatch>,
    /// Records in the parts: the batch ends at `base + count`.
    count: u64,
    /// Encoded size of the parts, against [`MERGED_BATCH_BYTES`].
    bytes: usize,
}

/// Largest stored batch that merging produce commands makes (encoded bytes). A single produce
/// batch above it is stored alone, as sent. Well under sled's blob threshold (about 128 KiB), above
/// which every value becomes a file of its own.
const MERGED_BATCH_BYTES: usize = 64 << 10;

/// From apply version 3 ([`MERGED_TAILS`]): an entry's records for a partition are merged into the
/// partition's last stored batch while both together stay within this many bytes (the stored
/// tail's length, crc and header included, plus the new records' encodings). Without it, one-record
/// requests at a low rate, one entry each, cost about 3.5× their payload at 100 B (a batch header,
/// a crc and a sled reference per record); merged, about 32 records of 100 B share them. A pure
/// function of replicated state (the tail's stored length and the new records), so boundaries
/// stay the same on every replica. The price: each merge writes the tail again (up to this many
/// bytes per entry; the dead versions are what compaction frees) and reads it back first.
const TAIL_MERGE_BYTES: usize = 4 << 10;

/// Replaced tail versions waiting for a durable flush (see [`Inner::superseded`]) past which apply
/// makes the store durable itself: about 40 bytes each.
#[cfg(not(test))]
const MAX_SUPERSEDED: usize = 65_536;
#[cfg(test)]
const MAX_SUPERSEDED: usize = 16;

impl<'a> Work<'a> {
    /// Evicts the least recently used producer states past `max` (see `producers`). Runs after each
    /// entry, never in the middle of one or once per apply call: which entries one call gets differs
    /// between nodes, and the states evicted must not.
    fn evict_producers(&mut self, max: usize) -> Result<(), StoreError> {
        if self.producers_live <= max || self.meta.apply_version < BOUNDED_PRODUCERS {
            return Ok(());
        }
        let held = self.producers.iter().filter(|(k, _)| !self.touched.contains_key(k));
        let changed = self.touched.iter().filter_map(|(k, st)| st.as_ref().map(|st| (k, st)));
        let live: Vec<_> = held.chain(changed).map(|(k, st)| (st.last_used, *k)).collect();
        let evicted = producers::choose_evictions(live, max);
        tracing::info!(
            evicted = evicted.len(),
            max,
            "evicting the least recently used idempotent producer states (the node's bound)"
        );
        for k in evicted {
            self.set_producer(k, None)?;
        }
        Ok(())
    }

    /// Moves to the rules of `version` (see `crate::apply_version`). A version this build does not
    /// know stops apply: the entries after it would be applied differently here than elsewhere.
    fn set_apply_version(&mut self, version: u32) -> Result<CommandResponse, StoreError> {
        if version > APPLY_VERSION {
            return Err(StoreError::corrupt(
                "apply version",
                format!(
                    "the log moves to apply version {version}; this build applies up to {APPLY_VERSION}: upgrade it"
                ),
            ));
        }
        let from = self.meta.apply_version;
        if version <= from {
            return Ok(CommandResponse::ApplyVersionSet { version: from });
        }
        if from < BOUNDED_PRODUCERS && version >= BOUNDED_PRODUCERS {
            // The stamps so far came from each node's own history (its build when it applied
            // each entry): replaced by one every node computes alike, key order.
            let mut keys: Vec<ProducerKey> = self.producers.keys().chain(self.touched.keys()).copied().collect();
            keys.sort_unstable();
            keys.dedup();
            let mut stamp = 0;
            for k in keys {
                if let Some(st) = self.producer(k).cloned() {
                    self.set_producer(k, Some(ProducerState { last_used: stamp, ..st }))?;
                    stamp += 1;
                }
            }
            self.producer_clock = stamp;
        }
        self.meta.apply_version = version;
        self.meta_batch.insert(APPLY_VERSION_KEY, checked::seal_bincode("apply version", &version)?);
        tracing::info!(from, to = version, "apply version raised");
        Ok(CommandResponse::ApplyVersionSet { version })
    }

    /// Changes (or with `None` removes) a producer state, in memory and in the queued writes.
    fn set_producer(&mut self, k: ProducerKey, st: Option<ProducerState>) -> Result<(), StoreError> {
        let was = self.producer(k).is_some();
        match &st {
            Some(st) => self.meta_batch.insert(producer_key(k), producers::encode_stored(st)?),
            None => self.meta_batch.remove(producer_key(k)),
        }
        self.producers_live = self.producers_live + usize::from(st.is_some()) - usize::from(was);
        self.touched.insert(k, st);
        Ok(())
    }

    fn producer(&self, k: ProducerKey) -> Option<&ProducerState> {
        match self.touched.get(&k) {
            Some(st) => st.as_ref(),
            None => self.producers.get(&k),
        }
    }

    /// Encodes and writes the pending merged batches, and the partition states they change.
    fn store_pending(&mut self) -> Result<(), StoreError> {
        for (at, p) in std::mem::take(&mut self.pending) {
            self.store_batch(at, p)?;
        }
        Ok(())
    }

    fn store_batch(&mut self, (id, partition): (u32, u32), p: PendingBatch<'a>) -> Result<(), StoreError> {
        let tail = self.mergeable_tail(id, partition, &p)?;
        let (base, count, encoded) = match &tail {
            Some((base, r, records)) => {
                let parts: Vec<&RecordBatch> = std::iter::once(records).chain(p.parts.iter().copied()).collect();
                (*base, u64::from(r.count) + p.count, batch::store(&parts)?)
            }
            None => (p.base, p.count, batch::store(&p.parts)?),
        };
        let what = || format!("new batch {id}/{partition}@{base}");
        let reference = self.files.store(self.generation, &what, &encoded)?;
        let state = self.meta.partitions.entry((id, partition)).or_default();
        state.bytes += encoded.len() as u64;
        if let Some((_, replaced, _)) = tail {
            state.bytes = state.bytes.saturating_sub(u64::from(replaced.len));
            self.superseded.push(replaced);
            // No snapshot pinned yet (none taken, or the node is opening): a rebuild could only
            // start from the empty store, but syncing costs little until the first snapshot.
            let pinned =
                self.pin.lock().map_err(lock_err)?.as_ref().is_none_or(|p| p.exports_batch_at(id, partition, base));
            self.merged_pinned |= pinned;
        }
        self.staged.insert((id, partition, base), (count, encoded.len() as u64));
        self.records_batch.insert(batch::key(id, partition, base)[..].into(), reference.encode()?.into());
        self.meta_batch.insert(partition_key(id, partition), checked::seal_bincode("partition state", state)?);
        Ok(())
    }

    /// The partition's last batch (its base, reference and records), if `p` is to be merged into
    /// it (see [`TAIL_MERGE_BYTES`]): read back and checked, so that a damaged tail stops apply
    /// rather than makes this replica's batches differ from the others'.
    fn mergeable_tail(
        &self,
        id: u32,
        partition: u32,
        p: &PendingBatch<'_>,
    ) -> Result<Option<(u64, BatchRef, RecordBatch)>, StoreError> {
        if self.meta.apply_version < MERGED_TAILS || p.bytes >= TAIL_MERGE_BYTES {
            return Ok(None);
        }
        let start = self.meta.partitions.get(&(id, partition)).map_or(0, |s| s.start_offset);
        // Batches below the start offset are dropped (a retention cut at the end drops the tail).
        let (from, to) = (batch::key(id, partition, start), batch::key(id, partition, u64::MAX));
        let range = (std::ops::Bound::Included(&from[..]), std::ops::Bound::Excluded(&to[..]));
        // The newest key, from this call's batches, earlier calls' uncommitted ones, or sled, in
        // that order for a key several hold (the first is the newest version).
        let mut candidates =
            vec![self.records_batch.range::<[u8], _>(range).next_back().map(|(k, v)| (k.clone(), v.clone()))];
        {
            let u = self.uncommitted.read().map_err(lock_err)?;
            if u.generation == self.generation {
                candidates.push(u.refs.range::<[u8], _>(range).next_back().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        candidates.push(self.records_tree.range(from..to).next_back().transpose()?);
        let mut newest: Option<(sled::IVec, sled::IVec)> = None;
        for (k, v) in candidates.into_iter().flatten() {
            if newest.as_ref().is_none_or(|(nk, _)| k > *nk) {
                newest = Some((k, v));
            }
        }
        let Some((key, value)) = newest else { return Ok(None) };
        let Some((_, _, base)) = batch::parse_key(&key) else {
            return Err(StoreError::corrupt(format!("partition {id}/{partition}"), "malformed batch key"));
        };
        let what = || format!("batch {id}/{partition}@{base} (the partition's last, to merge into)");
        let r = BatchRef::decode(&what, &value)?;
        if base + u64::from(r.count) != p.base {
            return Err(StoreError::corrupt(
                what(),
                format!("it ends at {} but the partition's next offset is {}", base + u64::from(r.count), p.base),
            ));
        }
        if r.len as usize + p.bytes > TAIL_MERGE_BYTES || u64::from(r.count) + p.count > u64::from(u32::MAX) {
            return Ok(None);
        }
        let stored = self.files.read(&what, &r)?;
        let envelope = stored.len() - checked::open(&what, &stored)?.len();
        let records = RecordBatch::from_bytes(Bytes::from(stored).slice(envelope..))
            .map_err(|e| StoreError::corrupt(what(), e.to_string()))?;
        if records.encoding() != p.encoding {
            // One encoding per batch (apply version 4): the tail stays as it is.
            return Ok(None);
        }
        if records.count() != r.count {
            return Err(StoreError::corrupt(
                what(),
                format!("it holds {} records, its reference says {}", records.count(), r.count),
            ));
        }
        Ok(Some((base, r, records)))
    }

    fn apply_one(&mut self, cmd: &'a Command) -> Result<CommandResponse, StoreError> {
        if !matches!(cmd, Command::Produce { .. } | Command::Batch(_)) {
            // Whatever else a command does (retention sizes batches, a deletion queues them) sees
            // the records produced before it as stored batches.
            self.store_pending()?;
        }
        Ok(match cmd {
            Command::CreateTopic { name, partitions, config } => self.create_topic(name, *partitions, *config)?,
            Command::DeleteTopic { name } => self.delete_topic(name)?,
            Command::Produce { topic, partition, records, producer } => {
                self.produce(topic, *partition, records, *producer)?
            }
            Command::JoinGroup { group, member_id, topics, session_timeout_ms } => {
                self.with_group(group, true, |g, t| g.join(member_id, topics, *session_timeout_ms, t))
            }
            Command::LeaveGroup { group, member_id } => self.with_group(group, false, |g, t| g.leave(member_id, t)),
            Command::CompleteRebalance { group, generation } => {
                self.with_group(group, false, |g, t| g.complete(*generation, t))
            }
            Command::CommitOffsets { group, member_id, generation, offsets } => {
                self.with_group(group, false, |g, t| g.commit(member_id, *generation, offsets, t))
            }
            Command::ResetOffsets { group, topic, to } => self.with_group(group, true, |g, t| g.reset(topic, *to, t)),
            Command::DeleteGroup { group } => match self.groups.get(group.as_str()) {
                None => rejected(ErrorCode::GroupIdNotFound, format!("no group {group}")),
                Some(g) if !g.members.is_empty() => rejected(
                    ErrorCode::NonEmptyGroup,
                    format!("group {group} has {} active member(s); stop them first", g.members.len()),
                ),
                Some(_) => {
                    self.groups.to_mut().remove(group.as_str());
                    self.touched_groups.insert(group.to_string());
                    CommandResponse::GroupChanged { generation: 0 }
                }
            },
            Command::AlterTopicConfig { name, config } => match self.meta.topics.get_mut(name) {
                None => rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {name}")),
                Some(t) => {
                    t.config = *config;
                    self.meta_batch.insert(topic_key(name), checked::seal_bincode("topic", &*t)?);
                    CommandResponse::TopicConfigChanged
                }
            },
            Command::TruncatePrefix { topic, topic_id, partition, new_start } => {
                self.truncate_prefix(topic, *topic_id, *partition, *new_start)?
            }
            // Each command of the batch is applied on its own (a rejected one changes nothing and
            // does not stop the others), exactly as if they had been consecutive entries.
            Command::Batch(cmds) => {
                let mut out = Vec::with_capacity(cmds.len());
                for c in cmds {
                    out.push(match c {
                        Command::Batch(_) => {
                            rejected(ErrorCode::InvalidRequest, "a batch of commands may not hold another batch".into())
                        }
                        c => self.apply_one(c)?,
                    });
                }
                CommandResponse::Batch(out)
            }
            Command::SetApplyVersion { version } => self.set_apply_version(*version)?,
            Command::InitProducerId => {
                let id = self.meta.next_producer_id;
                self.meta.next_producer_id = id
                    .checked_add(1)
                    .ok_or_else(|| StoreError::corrupt("next producer id", "producer ids exhausted"))?;
                self.meta_batch.insert(
                    NEXT_PRODUCER_ID_KEY,
                    checked::seal_bincode("next producer id", &self.meta.next_producer_id)?,
                );
                CommandResponse::ProducerIdAssigned { producer_id: id }
            }
        })
    }

    /// Runs `f` on a group (created first if `create`; otherwise a missing group is refused), and
    /// marks it to be written back if `f` changed it.
    fn with_group(
        &mut self,
        group: &GroupName,
        create: bool,
        f: impl FnOnce(&mut GroupState, &Topics<'_>) -> CommandResponse,
    ) -> CommandResponse {
        let name = group.to_string();
        let mut g = match self.groups.get(&name) {
            Some(g) => g.clone(),
            None if create => GroupState::default(),
            None => return rejected(ErrorCode::GroupIdNotFound, format!("no group {group}")),
        };
        let topics = Topics { by_name: &self.meta.topics, partitions: &self.meta.partitions };
        let resp = f(&mut g, &topics);
        if !matches!(resp, CommandResponse::Rejected { .. }) {
            self.groups.to_mut().insert(name.clone(), g);
            self.touched_groups.insert(name);
        }
        resp
    }

    /// After a topic is created or deleted: groups that subscribe to it (or hold offsets of it)
    /// drop what no longer exists and rebalance.
    fn topics_changed(&mut self, topic: &TopicName, deleted_id: Option<u32>) {
        let affected: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| {
                g.members.values().any(|m| m.topics.contains(topic))
                    || deleted_id.is_some_and(|id| g.committed.keys().any(|(t, _)| *t == id))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if affected.is_empty() {
            return;
        }
        let topics = Topics { by_name: &self.meta.topics, partitions: &self.meta.partitions };
        let groups = self.groups.to_mut();
        for name in affected {
            if let Some(g) = groups.get_mut(&name) {
                g.topics_changed(&topics);
                self.touched_groups.insert(name);
            }
        }
    }

    fn create_topic(
        &mut self,
        name: &TopicName,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<CommandResponse, StoreError> {
        let meta = &mut self.meta;
        if meta.topics.contains_key(name) {
            return Ok(rejected(ErrorCode::TopicAlreadyExists, format!("topic {name} already exists")));
        }
        if partitions == 0 {
            return Ok(rejected(ErrorCode::InvalidPartitions, "a topic needs at least one partition".into()));
        }
        let id = meta.next_topic_id;
        meta.next_topic_id =
            id.checked_add(1).ok_or_else(|| StoreError::corrupt("next topic id", "topic ids exhausted"))?;
        let t = TopicMeta { id, name: name.clone(), partitions, config };
        self.meta_batch.insert(topic_key(name), checked::seal_bincode("topic", &t)?);
        self.meta_batch.insert(NEXT_TOPIC_ID_KEY, checked::seal_bincode("next topic id", &meta.next_topic_id)?);
        for p in 0..partitions {
            let s = PartitionState::default();
            meta.partitions.insert((id, p), s);
            self.meta_batch.insert(partition_key(id, p), checked::seal_bincode("partition state", &s)?);
        }
        meta.topics.insert(name.clone(), t);
        self.topics_changed(name, None);
        Ok(CommandResponse::TopicCreated { topic_id: id })
    }

    fn truncate_prefix(
        &mut self,
        topic: &TopicName,
        topic_id: u32,
        partition: u32,
        new_start: u64,
    ) -> Result<CommandResponse, StoreError> {
        match self.meta.topics.get(topic) {
            Some(t) if t.id == topic_id && partition < t.partitions => {}
            // Deleted (or deleted and recreated) since the leader decided: nothing to do.
            _ => {
                return Ok(rejected(
                    ErrorCode::UnknownTopicOrPartition,
                    format!("no {topic}/{partition} (id {topic_id})"),
                ))
            }
        }
        let st = self.meta.partitions.entry((topic_id, partition)).or_default();
        if new_start <= st.start_offset {
            return Ok(CommandResponse::PrefixTruncated { start_offset: st.start_offset });
        }
        if new_start > st.end_offset {
            return Ok(rejected(
                ErrorCode::OffsetOutOfRange,
                format!("cannot drop {topic}/{partition} below {new_start}: its end offset is {}", st.end_offset),
            ));
        }
        // The bytes dropped are the batches in [start, new_start): the same batches on every replica,
        // whether stored by an earlier apply call or staged by this one (a replica catching up applies
        // a produce and the retention cut after it together; the leader never does).
        let (start, end) = (st.start_offset, st.end_offset);
        let mut dropped = 0u64;
        let mut boundary = new_start == end;
        let range = batch::key(topic_id, partition, start)..batch::key(topic_id, partition, new_start);
        for kv in self.records_tree.range(range) {
            let (k, v) = kv?;
            if let Some((_, _, base)) = batch::parse_key(&k) {
                if self.staged.contains_key(&(topic_id, partition, base)) {
                    // A tail this call merged into: its staged version is the newer.
                    continue;
                }
                let r = BatchRef::decode(&|| format!("batch {topic}/{partition}@{base}"), &v)?;
                dropped += u64::from(r.len);
                boundary |= base + u64::from(r.count) == new_start;
            }
        }
        for (&(_, _, base), &(count, size)) in
            self.staged.range((topic_id, partition, start)..(topic_id, partition, new_start))
        {
            dropped += size;
            boundary |= base + count == new_start;
        }
        // Retention cuts between whole batches; a cut inside one would leave its first records
        // unreadable on some paths (reads, snapshots and reclaim all go by batch). Refused the same
        // way on every replica.
        if !boundary {
            return Ok(rejected(
                ErrorCode::InvalidRequest,
                format!("cannot drop {topic}/{partition} below {new_start}: it is not a batch boundary"),
            ));
        }
        let st = self.meta.partitions.entry((topic_id, partition)).or_default();
        st.start_offset = new_start;
        st.bytes = st.bytes.saturating_sub(dropped);
        let st = *st;
        self.meta_batch.insert(partition_key(topic_id, partition), checked::seal_bincode("partition state", &st)?);
        self.meta_batch.insert(trim_key(topic_id, partition), checked::seal(&new_start.to_be_bytes()));
        // Groups whose committed offset fell below the new start resume at the start.
        let behind: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.committed.get(&(topic_id, partition)).is_some_and(|c| *c < new_start))
            .map(|(name, _)| name.clone())
            .collect();
        for name in behind {
            if let Some(g) = self.groups.to_mut().get_mut(&name) {
                if g.clamp_committed((topic_id, partition), new_start) {
                    self.group_offsets_moved += 1;
                    self.touched_groups.insert(name);
                }
            }
        }
        Ok(CommandResponse::PrefixTruncated { start_offset: new_start })
    }

    fn delete_topic(&mut self, name: &TopicName) -> Result<CommandResponse, StoreError> {
        let Some(t) = self.meta.topics.remove(name) else {
            return Ok(rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {name}")));
        };
        self.meta_batch.remove(topic_key(name));
        for p in 0..t.partitions {
            self.meta.partitions.remove(&(t.id, p));
            self.meta_batch.remove(partition_key(t.id, p));
        }
        // The topic's producer states go with it (its id is never reused).
        let gone: Vec<ProducerKey> =
            self.producers.keys().chain(self.touched.keys()).filter(|(_, tid, _)| *tid == t.id).copied().collect();
        for k in gone {
            self.set_producer(k, None)?;
        }
        self.meta_batch.insert(reclaim_key(t.id), checked::seal_bincode("reclaim", &t.partitions)?);
        self.topics_changed(name, Some(t.id));
        Ok(CommandResponse::TopicDeleted)
    }

    /// Appends a batch to a partition. The records are stored when the entry is done
    /// ([`Work::store_pending`]), together with those of the entry's other produce commands to the
    /// same partition while they fit [`MERGED_BATCH_BYTES`]: one sled value instead of one per
    /// request is what lets one-record requests apply at the rate they commit. Offsets, answers and
    /// the idempotence window are per command, as if each were stored alone.
    fn produce(
        &mut self,
        topic: &TopicName,
        partition: u32,
        records: &'a RecordBatch,
        producer: Option<ProducerSeq>,
    ) -> Result<CommandResponse, StoreError> {
        let Some(t) = self.meta.topics.get(topic) else {
            return Ok(rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {topic}")));
        };
        if partition >= t.partitions {
            return Ok(rejected(
                ErrorCode::UnknownTopicOrPartition,
                format!("topic {topic} has partitions 0..{}; {partition} does not exist", t.partitions),
            ));
        }
        if records.is_empty() {
            return Ok(rejected(ErrorCode::InvalidRequest, "a produce batch needs at least one record".into()));
        }
        if records.encoding() == RecordEncoding::Varint && self.meta.apply_version < VARINT_RECORDS {
            return Ok(rejected(
                ErrorCode::InvalidRequest,
                format!(
                    "records in the varint encoding before the cluster applies at version {VARINT_RECORDS}: a member may \
                     not read them"
                ),
            ));
        }
        let count = records.count();
        let id = t.id;
        if let Some(ps) = producer {
            if ps.producer_id < FIRST_PRODUCER_ID || ps.producer_id >= self.meta.next_producer_id {
                return Ok(rejected(
                    ErrorCode::UnknownProducerId,
                    format!("producer id {} was not handed out by this cluster", ps.producer_id),
                ));
            }
            let state = self.producer((ps.producer_id, id, partition));
            if state.is_none() && ps.sequence > 0 && self.meta.apply_version >= BOUNDED_PRODUCERS {
                // A partition's first batch from a producer is sequence 0: this one's state was
                // evicted (or its topic recreated), so a retry cannot be told from a new batch.
                return Ok(rejected(
                    ErrorCode::UnknownProducerId,
                    format!(
                        "producer {} has no state in {topic}/{partition} for batch {} (least recently used \
                         producer states are evicted past the node's bound); continue under a new producer id",
                        ps.producer_id, ps.sequence
                    ),
                ));
            }
            if let Some(st) = state {
                if let Some(&(_, base, n)) = st.recent.iter().find(|(seq, _, _)| *seq == ps.sequence) {
                    return Ok(CommandResponse::Produced { base_offset: base, count: n, duplicate: true });
                }
                if let Some(&(last, _, _)) = st.recent.back() {
                    if ps.sequence <= last {
                        return Ok(rejected(
                            ErrorCode::DuplicateSequenceNumber,
                            format!(
                                "batch {} of producer {} in {topic}/{partition} is older than the {PRODUCER_WINDOW} \
                                 batches remembered (last {last})",
                                ps.sequence, ps.producer_id
                            ),
                        ));
                    }
                    if ps.sequence != last + 1 {
                        return Ok(rejected(
                            ErrorCode::OutOfOrderSequenceNumber,
                            format!(
                                "producer {} sent batch {} to {topic}/{partition}; expected {}",
                                ps.producer_id,
                                ps.sequence,
                                last + 1
                            ),
                        ));
                    }
                }
            }
        }
        let base = self.meta.partitions.get(&(id, partition)).map_or(0, |s| s.end_offset);
        let bytes = records.len();
        let encoding = records.encoding();
        let joins = self
            .pending
            .get(&(id, partition))
            .is_some_and(|p| p.bytes + bytes <= MERGED_BATCH_BYTES && p.encoding == encoding);
        if !joins {
            if let Some(full) = self.pending.remove(&(id, partition)) {
                self.store_batch((id, partition), full)?;
            }
            self.pending
                .insert((id, partition), PendingBatch { base, encoding, parts: Vec::new(), count: 0, bytes: 0 });
        }
        if let Some(p) = self.pending.get_mut(&(id, partition)) {
            debug_assert_eq!(p.base + p.count, base, "a pending batch ends where the partition ends");
            p.parts.push(records);
            p.count += u64::from(count);
            p.bytes += bytes;
        }
        let state = self.meta.partitions.entry((id, partition)).or_default();
        state.end_offset = base + u64::from(count);
        if let Some(ps) = producer {
            let k = (ps.producer_id, id, partition);
            let mut st = self.producer(k).cloned().unwrap_or_default();
            st.recent.push_back((ps.sequence, base, count));
            while st.recent.len() > PRODUCER_WINDOW {
                st.recent.pop_front();
            }
            st.last_used = self.producer_clock;
            self.producer_clock += 1;
            self.set_producer(k, Some(st))?;
        }
        Ok(CommandResponse::Produced { base_offset: base, count, duplicate: false })
    }
}

/// Writes a snapshot stream into an empty generation, checking every frame.
fn fill_generation<R: Read>(
    gen: &Generation,
    files: &BatchFiles,
    r: R,
    what: &str,
) -> Result<SnapshotHeader, StoreError> {
    const FLUSH_EVERY: usize = 1024;
    let mut reader = FrameReader::new(r, what)?;
    let header: SnapshotHeader = match reader.next_frame()? {
        Some((FrameKind::Header, body)) => {
            SnapshotHeader::decode(&body).map_err(|e| reader.bad(format!("header: {e}")))?
        }
        _ => return Err(reader.bad("the first frame is not a header".into())),
    };
    let mut mb = sled::Batch::default();
    if let Some(applied) = &header.applied {
        mb.insert(APPLIED_KEY, checked::seal(applied));
    }
    mb.insert(NEXT_TOPIC_ID_KEY, checked::seal_bincode("next topic id", &header.next_topic_id)?);
    mb.insert(NEXT_PRODUCER_ID_KEY, checked::seal_bincode("next producer id", &header.next_producer_id)?);
    if header.apply_version > APPLY_VERSION {
        return Err(reader.bad(format!(
            "the snapshot is at apply version {}; this build applies up to {APPLY_VERSION}: upgrade this node",
            header.apply_version
        )));
    }
    mb.insert(APPLY_VERSION_KEY, checked::seal_bincode("apply version", &header.apply_version)?);
    // Headers written before stamps existed carry none: those states read as the oldest.
    let stamps: HashMap<ProducerKey, u64> = header.producer_stamps.iter().copied().collect();
    for (k, st) in &header.producers {
        let st = ProducerState { last_used: stamps.get(k).copied().unwrap_or(0), ..st.clone() };
        mb.insert(producer_key(*k), producers::encode_stored(&st)?);
    }
    for (name, g) in &header.groups {
        mb.insert(group_key(name), checked::seal_bincode("group", g)?);
    }
    for t in &header.topics {
        mb.insert(topic_key(&t.name), checked::seal_bincode("topic", t)?);
    }
    for (t, p, s) in &header.partitions {
        mb.insert(partition_key(*t, *p), checked::seal_bincode("partition state", s)?);
    }
    gen.meta_tree.apply_batch(mb)?;

    let mut batch = sled::Batch::default();
    let mut pending = 0;
    let mut count = 0u64;
    // Where each partition's next batch must start: its batches cover start..end exactly, or a
    // later merge into its last batch (apply version 3) would not find the end it expects.
    let mut next: HashMap<(u32, u32), (u64, u64)> =
        header.partitions.iter().map(|(t, p, s)| ((*t, *p), (s.start_offset, s.end_offset))).collect();
    loop {
        match reader.next_frame()? {
            Some((FrameKind::Batch, body)) => {
                if body.len() < 16 {
                    return Err(reader.bad("batch frame shorter than its key".into()));
                }
                let (k, v) = body.split_at(16);
                let what = || format!("snapshot batch {k:?}");
                let records = batch::decode(&what, v)?.len() as u64;
                let Some((t, p, base)) = batch::parse_key(k) else {
                    return Err(reader.bad(format!("malformed batch key {k:?}")));
                };
                match next.get_mut(&(t, p)) {
                    Some((at, end)) if *at == base && base + records <= *end => *at = base + records,
                    Some((at, end)) => {
                        return Err(reader.bad(format!(
                            "batch {t}/{p}@{base} of {records} records: the partition's batches must cover \
                             {at}..{end} in order"
                        )))
                    }
                    None => return Err(reader.bad(format!("batch {t}/{p}@{base} of a partition the header lacks"))),
                }
                batch.insert(k, files.store(gen.id, &what, v)?.encode()?);
                pending += 1;
                count += 1;
                if pending >= FLUSH_EVERY {
                    gen.records.apply_batch(std::mem::take(&mut batch))?;
                    pending = 0;
                }
            }
            Some((FrameKind::End, body)) => {
                let expected = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
                if expected != Some(count) {
                    return Err(reader.bad(format!("end frame says {expected:?} batches, stream had {count}")));
                }
                if let Some(((t, p), (at, end))) = next.iter().find(|(_, (at, end))| at != end) {
                    return Err(
                        reader.bad(format!("partition {t}/{p}: its batches end at {at}, its end offset is {end}"))
                    );
                }
                gen.records.apply_batch(batch)?;
                return Ok(header);
            }
            Some((FrameKind::Header, _)) => return Err(reader.bad("second header frame".into())),
            None => return Err(reader.bad("stream ended before its end frame".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a store, waiting out the lock of one just dropped: sled releases its file lock when
    /// its last internal reference goes, which a background thread may hold a moment longer.
    fn open_store(path: &Path) -> TopicStore {
        open_store_with(path, &TopicStoreOptions::default())
    }

    fn open_store_with(path: &Path, opts: &TopicStoreOptions) -> TopicStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match TopicStore::open(path, opts) {
                Ok(store) => return store,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("open {}: {e}", path.display()),
            }
        }
    }

    fn rec(v: &str) -> Record {
        Record { key: None, value: Bytes::from(v.to_string()), headers: vec![], timestamp_ms: 1 }
    }

    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn batch_of(records: Vec<Record>) -> RecordBatch {
        RecordBatch::encode(&records, RecordEncoding::Bincode).unwrap()
    }

    fn produce(store: &TopicStore, topic: &str, p: u32, vals: &[&str], pos: u8) -> CommandResponse {
        let cmd = Command::Produce {
            topic: name(topic),
            partition: p,
            records: batch_of(vals.iter().map(|v| rec(v)).collect()),
            producer: None,
        };
        store.apply(&[Some(&cmd)], Bytes::from(vec![pos])).unwrap().remove(0)
    }

    /// A batch applies each command as if it had its own entry: a rejected one (unknown topic, a
    /// nested batch) changes nothing and the others still apply, in order.
    #[test]
    fn a_batch_applies_each_command_in_order_and_answers_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let produce_cmd = |topic: &str, vals: &[&str]| Command::Produce {
            topic: name(topic),
            partition: 0,
            records: batch_of(vals.iter().map(|v| rec(v)).collect()),
            producer: None,
        };
        let batch = Command::Batch(vec![
            Command::CreateTopic { name: name("b"), partitions: 1, config: TopicConfig::default() },
            produce_cmd("b", &["a", "b"]),
            produce_cmd("missing", &["x"]),
            Command::Batch(vec![produce_cmd("b", &["nested"])]),
            produce_cmd("b", &["c"]),
        ]);
        let resp = store.apply(&[Some(&batch)], Bytes::from_static(b"1")).unwrap();
        let [CommandResponse::Batch(answers)] = resp.as_slice() else { panic!("one batch answer, got {resp:?}") };
        assert_eq!(answers.len(), 5, "{answers:?}");
        assert_eq!(answers[0], CommandResponse::TopicCreated { topic_id: 0 });
        assert_eq!(answers[1], CommandResponse::Produced { base_offset: 0, count: 2, duplicate: false });
        assert!(
            matches!(&answers[2], CommandResponse::Rejected { code: ErrorCode::UnknownTopicOrPartition, .. }),
            "{:?}",
            answers[2]
        );
        assert!(
            matches!(&answers[3], CommandResponse::Rejected { code: ErrorCode::InvalidRequest, .. }),
            "{:?}",
            answers[3]
        );
        assert_eq!(answers[4], CommandResponse::Produced { base_offset: 2, count: 1, duplicate: false });
        let r = store.read("b", 0, 0, 10, 1 << 20).unwrap();
        let vals: Vec<_> = r.records.iter().map(|(o, r)| (*o, r.value.clone())).collect();
        assert_eq!(vals, vec![(0, Bytes::from("a")), (1, Bytes::from("b")), (2, Bytes::from("c"))]);
        assert_eq!(store.applied().unwrap(), Some(Bytes::from_static(b"1")));
    }

    #[test]
    fn apply_assigns_consecutive_offsets_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("orders"), partitions: 2, config: TopicConfig::default() };
        assert_eq!(
            store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap(),
            vec![CommandResponse::TopicCreated { topic_id: 0 }]
        );
        assert_eq!(
            produce(&store, "orders", 0, &["a", "b"], 2),
            CommandResponse::Produced { base_offset: 0, count: 2, duplicate: false }
        );
        assert_eq!(
            produce(&store, "orders", 0, &["c"], 3),
            CommandResponse::Produced { base_offset: 2, count: 1, duplicate: false }
        );
        assert_eq!(
            produce(&store, "orders", 1, &["x"], 4),
            CommandResponse::Produced { base_offset: 0, count: 1, duplicate: false }
        );
        let r = store.read("orders", 0, 1, 10, 1 << 20).unwrap();
        let vals: Vec<_> = r.records.iter().map(|(o, r)| (*o, r.value.clone())).collect();
        assert_eq!(vals, vec![(1, Bytes::from("b")), (2, Bytes::from("c"))]);
        assert_eq!((r.start_offset, r.end_offset), (0, 3));
        assert!(matches!(
            store.read("orders", 0, 4, 10, 100),
            Err(StoreError::OffsetOutOfRange { start: 0, end: 3, .. })
        ));
        assert!(matches!(store.read("orders", 2, 0, 10, 100), Err(StoreError::UnknownTopicOrPartition { .. })));
        assert!(matches!(
            produce(&store, "nope", 0, &["a"], 5),
            CommandResponse::Rejected { code: ErrorCode::UnknownTopicOrPartition, .. }
        ));
        assert_eq!(store.applied().unwrap(), Some(Bytes::from(vec![5])));
        // Max records and max bytes bound a read, but at least one record comes back.
        assert_eq!(store.read("orders", 0, 0, 1, 1 << 20).unwrap().records.len(), 1);
        assert_eq!(store.read("orders", 0, 0, 10, 1).unwrap().records.len(), 1);
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_store(dir.path());
            let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
            store.apply(&[Some(&create), None], Bytes::from_static(b"x")).unwrap();
            produce(&store, "t", 0, &["a", "b", "c"], 9);
            store.flush_durable().unwrap();
        }
        let store = open_store(dir.path());
        assert_eq!(store.applied().unwrap(), Some(Bytes::from(vec![9])));
        assert_eq!(store.read("t", 0, 0, 10, 1 << 20).unwrap().records.len(), 3);
        assert_eq!(
            produce(&store, "t", 0, &["d"], 10),
            CommandResponse::Produced { base_offset: 3, count: 1, duplicate: false }
        );
    }

    #[test]
    fn snapshot_round_trip_replaces_state_and_ignores_later_appends() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let a = open_store(a_dir.path());
        let b = open_store(b_dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 3, config: TopicConfig::default() };
        a.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        for i in 0..50u8 {
            produce(&a, "t", u32::from(i % 3), &["r1", "r2"], i);
        }
        // b has unrelated state that the install must replace entirely.
        let other = Command::CreateTopic { name: name("other"), partitions: 1, config: TopicConfig::default() };
        b.apply(&[Some(&other)], Bytes::from_static(b"z")).unwrap();

        let manifest = a.capture_snapshot().unwrap();
        assert_eq!(manifest.applied(), Some(Bytes::from(vec![49])));
        produce(&a, "t", 0, &["after"], 99); // not in the snapshot, although streamed after it
        let (summary, buf) = a.export_snapshot(&manifest, Vec::new()).unwrap();
        assert_eq!(summary.batches, 50);
        let installed = b.import_snapshot(&buf[..], "test").unwrap();
        assert_eq!(installed.applied(), Some(Bytes::from(vec![49])));
        assert!(b.topic("other").unwrap().is_none());
        let offs = b.partition_offsets("t").unwrap();
        assert_eq!(offs.iter().map(|p| p.end_offset).collect::<Vec<_>>(), vec![34, 34, 32]);
        assert_eq!(b.read("t", 1, 0, 1000, 1 << 20).unwrap().records.len(), 34);
        b.reclaim(1000).unwrap();
        // The install survives a reopen.
        drop(b);
        let b = open_store(b_dir.path());
        assert_eq!(b.partition_offsets("t").unwrap()[0].end_offset, 34);
    }

    #[test]
    fn corrupt_snapshot_is_rejected_and_leaves_state() {
        let a_dir = tempfile::tempdir().unwrap();
        let a = open_store(a_dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        a.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&a, "t", 0, &["hello"], 2);
        let manifest = a.capture_snapshot().unwrap();
        let (_, mut buf) = a.export_snapshot(&manifest, Vec::new()).unwrap();
        let n = buf.len();
        buf[n - 20] ^= 0x40;
        let b_dir = tempfile::tempdir().unwrap();
        let b = open_store(b_dir.path());
        assert!(b.import_snapshot(&buf[..], "bad").is_err());
        assert!(b.list_topics().unwrap().is_empty());
        // Cut short: also rejected.
        let (_, buf) = a.export_snapshot(&manifest, Vec::new()).unwrap();
        assert!(b.import_snapshot(&buf[..buf.len() - 5], "short").is_err());
    }

    #[test]
    fn delete_hides_at_once_and_reclaim_frees_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        for i in 0..10 {
            produce(&store, "t", 0, &["v"], i);
        }
        let delete = Command::DeleteTopic { name: name("t") };
        assert_eq!(
            store.apply(&[Some(&delete)], Bytes::from_static(b"2")).unwrap(),
            vec![CommandResponse::TopicDeleted]
        );
        assert!(matches!(store.read("t", 0, 0, 10, 100), Err(StoreError::UnknownTopicOrPartition { .. })));
        assert_eq!(store.reclaim(4).unwrap(), 4);
        assert_eq!(store.pending_reclaim().unwrap(), 1);
        assert_eq!(store.reclaim(100).unwrap(), 6);
        assert_eq!(store.pending_reclaim().unwrap(), 0);
        // Recreated with the same name: starts empty, with a new id.
        assert_eq!(
            store.apply(&[Some(&create)], Bytes::from_static(b"3")).unwrap(),
            vec![CommandResponse::TopicCreated { topic_id: 1 }]
        );
        assert_eq!(store.partition_offsets("t").unwrap()[0].end_offset, 0);
    }

    #[test]
    fn a_corrupted_batch_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&store, "t", 0, &["hello"], 2);
        commit(&store);
        let records = store.current().unwrap().generation.records;
        let (k, v) = records.iter().next().unwrap().unwrap();
        let mut bad = v.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        records.insert(k.clone(), bad).unwrap();
        assert!(matches!(store.read("t", 0, 0, 10, 100), Err(StoreError::Corrupt { .. })));

        // The batch bytes themselves, in their file.
        records.insert(k, v).unwrap();
        assert_eq!(store.read("t", 0, 0, 10, 100).unwrap().records.len(), 1);
        let file = batch_file_paths(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let err = store.read("t", 0, 0, 10, 100).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    fn batch_file_paths(store_dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(store_dir.join("batches")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    #[test]
    fn a_store_of_the_earlier_layout_moves_its_batches_to_files_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 2, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        for i in 0..3000u32 {
            produce(&store, "t", i % 2, &[format!("v{i}").as_str()], 2);
        }
        // Back to the earlier layout: the stored batches themselves in sled, no layout key, no files.
        let old = stored_batches(&store);
        let records = store.current().unwrap().generation.records;
        for (k, v) in &old {
            records.insert(k.as_slice(), v.as_slice()).unwrap();
        }
        store.inner.db.remove(LAYOUT_KEY).unwrap();
        store.inner.db.flush().unwrap();
        drop((store, records));
        for f in batch_file_paths(dir.path()) {
            std::fs::remove_file(f).unwrap();
        }

        let store = open_store(dir.path());
        assert!(store.lost_data().unwrap().is_none());
        assert!(store.inner.db.get(LAYOUT_KEY).unwrap().is_some());
        assert_eq!(stored_batches(&store), old, "every batch moved whole, under the same key");
        let r = store.read("t", 1, 0, 10_000, usize::MAX).unwrap();
        assert_eq!(r.records.len(), 1500);
        assert_eq!(r.records[1499].1.value, Bytes::from("v2999"));
        drop(store);
        // Converted once: a second open finds references and leaves them.
        let store = open_store(dir.path());
        assert_eq!(stored_batches(&store), old);
    }

    #[test]
    fn a_conversion_cut_short_leaves_converted_references_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        for i in 0..5 {
            produce(&store, "t", 0, &[format!("v{i}").as_str()], 2);
        }
        // References in place but no layout key: as if a conversion stopped after its last chunk.
        store.inner.db.remove(LAYOUT_KEY).unwrap();
        store.inner.db.flush().unwrap();
        drop(store);
        let store = open_store(dir.path());
        assert_eq!(store.read("t", 0, 0, 10, 1 << 20).unwrap().records.len(), 5);
    }

    /// Reclaim unlinked a file, then the process died before sled's deletion of the references
    /// reached the disk: the stale (unreachable) references come back at open. A new file must never
    /// get the dead file's number, or their release would unlink it with live batches in it.
    #[test]
    fn a_batch_file_number_is_never_reused_after_stale_references_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = |n: &str| Command::CreateTopic { name: name(n), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create("a"))], Bytes::from_static(b"1")).unwrap();
        produce(&store, "a", 0, &["a1"], 2);
        produce(&store, "a", 0, &["a2"], 3);
        store.apply(&[Some(&Command::DeleteTopic { name: name("a") })], Bytes::from_static(b"4")).unwrap();
        store.flush_durable().unwrap();
        let cur = store.current().unwrap();
        let saved: Vec<_> = cur.generation.records.iter().map(|kv| kv.unwrap()).collect();
        let markers: Vec<_> = cur.generation.meta_tree.scan_prefix(b"reclaim/").map(|kv| kv.unwrap()).collect();
        while store.reclaim(16).unwrap() > 0 {}
        assert!(batch_file_paths(dir.path()).is_empty());
        for (k, v) in &saved {
            cur.generation.records.insert(k, v.clone()).unwrap();
        }
        for (k, v) in &markers {
            cur.generation.meta_tree.insert(k, v.clone()).unwrap();
        }
        store.inner.db.flush().unwrap();
        drop((store, cur));

        let store = open_store(dir.path());
        assert!(store.lost_data().unwrap().is_none(), "the stale references are unreachable");
        store.apply(&[Some(&create("b"))], Bytes::from_static(b"5")).unwrap();
        produce(&store, "b", 0, &["b1"], 6);
        produce(&store, "b", 0, &["b2"], 7);
        while store.reclaim(16).unwrap() > 0 {}
        assert_eq!(store.read("b", 0, 0, 10, 1 << 20).unwrap().records.len(), 2);
        assert_eq!(batch_file_paths(dir.path()).len(), 1);
    }

    #[test]
    fn batch_bytes_live_in_files_that_go_when_their_last_batch_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        let big = "x".repeat(1 << 20);
        // 70 batches of 1 MiB: more than one 64 MiB file.
        for _ in 0..70 {
            produce(&store, "t", 0, &[big.as_str()], 2);
        }
        assert_eq!(batch_file_paths(dir.path()).len(), 2);
        let in_sled: usize = store.current().unwrap().generation.records.iter().map(|kv| kv.unwrap().1.len()).sum();
        assert!(in_sled < 70 * 100, "sled holds references only, not the {} MiB of batches ({in_sled} B)", 70);
        assert!(store.size_on_disk().unwrap() > 70 << 20);
        assert_eq!(store.read("t", 0, 69, 1, 1).unwrap().records[0].1.value.len(), 1 << 20);

        store.apply(&[Some(&Command::DeleteTopic { name: name("t") })], Bytes::from_static(b"3")).unwrap();
        while store.reclaim(16).unwrap() > 0 {}
        // Both go, the one still open for appends too.
        assert_eq!(batch_file_paths(dir.path()).len(), 0);
        assert_eq!(store.size_on_disk().unwrap(), store.inner.db.size_on_disk().unwrap());
        // Appends go on in a new file.
        let create = Command::CreateTopic { name: name("u"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"4")).unwrap();
        produce(&store, "u", 0, &["after"], 5);
        assert_eq!(batch_file_paths(dir.path()).len(), 1);
        drop(store);
        let store = open_store(dir.path());
        assert!(store.lost_data().unwrap().is_none());
        assert_eq!(store.read("u", 0, 0, 10, 1 << 20).unwrap().records.len(), 1);
    }

    /// Small batch files, so a few KiB of batches span several.
    fn small_files() -> TopicStoreOptions {
        TopicStoreOptions { batch_file_bytes: 8 << 10, ..TopicStoreOptions::default() }
    }

    fn create(store: &TopicStore, topic: &str, pos: u8) {
        let cmd = Command::CreateTopic { name: name(topic), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&cmd)], Bytes::from(vec![pos])).unwrap();
    }

    /// Writes `rounds` batches of about 900 B to `bulk` and, every fourth, a small one to `keep`
    /// (its values are `prefix` and the round), then deletes `bulk` and reclaims it: every file is
    /// left holding a few small batches among dead bytes. Returns the values written to `keep`.
    fn interleave_then_delete(store: &TopicStore, bulk: &str, keep: &str, prefix: &str, rounds: usize) -> Vec<String> {
        create(store, bulk, 1);
        let filler = "f".repeat(900);
        let mut kept = Vec::new();
        for i in 0..rounds {
            produce(store, bulk, 0, &[filler.as_str()], 2);
            if i % 4 == 0 {
                let v = format!("{prefix}-{i}");
                produce(store, keep, 0, &[v.as_str()], 2);
                kept.push(v);
            }
        }
        store.apply(&[Some(&Command::DeleteTopic { name: name(bulk) })], Bytes::from_static(b"3")).unwrap();
        while store.reclaim(1000).unwrap() > 0 {}
        kept
    }

    fn values(store: &TopicStore, topic: &str) -> Vec<String> {
        let fetched = store.read(topic, 0, 0, 100_000, usize::MAX).unwrap();
        fetched.records.iter().map(|(_, r)| String::from_utf8(r.value.to_vec()).unwrap()).collect()
    }

    /// The case compaction exists for: a topic whose batches were deleted shares its files with one
    /// still retained, which used to keep every one of those files whole.
    #[test]
    fn compaction_frees_files_that_retained_batches_kept_and_everything_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        let kept = interleave_then_delete(&store, "bulk", "keep", "k", 64);
        // A snapshot taken before compaction: it must still export whole after its batches moved.
        let early = store.capture_snapshot().unwrap();
        store.pin_snapshot(&early).unwrap();
        let before = batch_file_paths(dir.path()).len();
        assert!(before >= 6, "64 batches of 900 B in 8 KiB files: {before} files");
        let size_before = store.inner.files.size().unwrap();

        let summary = store.compact(u64::MAX).unwrap();
        assert!(summary.files >= before - 2, "{summary:?} of {before} files");
        // Those in the file apply still appends to stay (at most two: one per 4 × 900 B).
        let n = kept.len() as u64;
        assert!((n - 2..n).contains(&summary.batches), "all but the active file's batches move: {summary:?} of {n}");
        let after = batch_file_paths(dir.path()).len();
        assert_eq!(after, before - summary.files + 1, "the emptied files go; the copies share one new file");
        assert!(
            store.inner.files.size().unwrap() < size_before / 4,
            "{} of {size_before} bytes left",
            store.inner.files.size().unwrap()
        );
        assert_eq!(values(&store, "keep"), kept);
        assert_eq!(store.compact(u64::MAX).unwrap(), CompactionSummary::default(), "nothing sparse is left");

        // The snapshot pinned before names the same batches by key: it exports from their copies.
        let mut buf = Vec::new();
        store.export_snapshot(&early, &mut buf).unwrap();
        let other = tempfile::tempdir().unwrap();
        let installed = open_store(other.path());
        installed.import_snapshot(&buf[..], "compacted").unwrap();
        assert_eq!(values(&installed, "keep"), kept);
        // And the new references are what a reopened store (or one after a crash) finds.
        drop(store);
        let store = open_store_with(dir.path(), &small_files());
        assert!(store.lost_data().unwrap().is_none());
        assert_eq!(batch_file_paths(dir.path()).len(), after);
        assert_eq!(values(&store, "keep"), kept);
        produce(&store, "keep", 0, &["after"], 4);
        assert_eq!(values(&store, "keep").last().map(String::as_str), Some("after"));
    }

    /// A process that dies in the middle of a round loses nothing: at open, whichever side of the
    /// swap it died on, the files nothing references go and every record reads back.
    #[test]
    fn a_compaction_cut_short_by_a_crash_leaves_a_whole_store_and_no_leftover_files() {
        for step in [CompactionStep::Copied, CompactionStep::Swapped] {
            let dir = tempfile::tempdir().unwrap();
            let store = open_store_with(dir.path(), &small_files());
            create(&store, "keep", 0);
            let kept = interleave_then_delete(&store, "bulk", "keep", "k", 48);
            let before = batch_file_paths(dir.path());
            *store.inner.compaction_crash.lock().unwrap() = Some(step);
            store.compact(u64::MAX).unwrap();
            let after_round = batch_file_paths(dir.path());
            assert_eq!(after_round.len(), before.len() + 1, "{step:?}: the copies' file, nothing unlinked yet");
            drop(store);

            let store = open_store_with(dir.path(), &small_files());
            assert!(store.lost_data().unwrap().is_none(), "{step:?}");
            assert_eq!(values(&store, "keep"), kept, "{step:?}");
            let reopened = batch_file_paths(dir.path());
            let copies: Vec<_> = after_round.iter().filter(|p| !before.contains(p)).collect();
            match step {
                // Nothing names the copies: they go, the old files stay (and compact again).
                CompactionStep::Copied => {
                    assert_eq!(reopened, before, "{step:?}");
                    assert!(store.compact(u64::MAX).unwrap().files > 0);
                    assert_eq!(values(&store, "keep"), kept);
                }
                // The references name the copies: the old sparse files go.
                CompactionStep::Swapped => {
                    assert!(copies.iter().all(|p| reopened.contains(p)), "{step:?}");
                    assert!(reopened.len() <= 3, "{step:?}: {} files left", reopened.len());
                }
                CompactionStep::LaterChunkFails => unreachable!("not a crash step"),
            }
        }
    }

    /// A swap chunk that fails after earlier ones went through: the files those emptied go at
    /// once (not at the next open), the error is reported, and the next round moves the rest.
    #[test]
    fn a_failed_swap_chunk_still_releases_what_the_chunks_before_it_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        // 12 kept batches, about two per file: the first chunk (8) empties several files.
        let kept = interleave_then_delete(&store, "bulk", "keep", "k", 48);
        let before = batch_file_paths(dir.path());
        *store.inner.compaction_crash.lock().unwrap() = Some(CompactionStep::LaterChunkFails);
        assert!(store.compact(u64::MAX).is_err(), "the failed chunk is reported");
        let after_round = batch_file_paths(dir.path());
        let freed = before.iter().filter(|p| !after_round.contains(p)).count();
        assert!(freed > 0, "the first chunk's files stay: {before:?} -> {after_round:?}");
        assert_eq!(store.compaction_totals().unwrap().files, freed);
        assert_eq!(values(&store, "keep"), kept);
        *store.inner.compaction_crash.lock().unwrap() = None;
        let rounds = compact_until_done(&store, "after a failed chunk");
        assert!(rounds.iter().any(|r| r.files > 0), "the rest moves: {rounds:?}");
        let done = batch_file_paths(dir.path());
        drop(store);
        // Nothing was left for the next open to clean up.
        let store = open_store_with(dir.path(), &small_files());
        assert_eq!(batch_file_paths(dir.path()), done);
        assert_eq!(values(&store, "keep"), kept);
    }

    fn file(seq: u64, live_percent: u64) -> FileUse {
        FileUse { seq, len: 1000, live_bytes: live_percent * 10 }
    }

    #[test]
    fn files_to_compact_takes_every_sparse_file_then_the_emptiest_until_under_the_space_target() {
        let none = BTreeSet::new();
        let chosen = |closed: Vec<FileUse>, unmovable: &BTreeSet<u64>, budget: u64| {
            let held = closed.iter().map(|f| f.len).sum();
            let live = closed.iter().map(|f| f.live_bytes).sum();
            files_to_compact(GenerationUse { closed, held, live }, unmovable, budget).into_keys().collect::<Vec<_>>()
        };
        // Half live or less: always, even with the files well under the target overall.
        let mut closed = vec![file(1, 40)];
        closed.extend((2..20).map(|s| file(s, 100)));
        assert_eq!(chosen(closed, &none, u64::MAX), vec![1]);
        // Four files at 60% hold 1.67× their live bytes (4,000 of 2,400). One copy leaves 3,600
        // (1.5×), still over 1.4×; two leave 3,200 (1.33×).
        let closed = vec![file(1, 60), file(2, 60), file(3, 60), file(4, 60)];
        assert_eq!(chosen(closed, &none, u64::MAX), vec![1, 2]);
        // At 55%, 1.82×: 3,550, then 3,100 (1.41×), then 2,650 of 2,200.
        let closed = vec![file(1, 55), file(2, 55), file(3, 55), file(4, 55)];
        assert_eq!(chosen(closed, &none, u64::MAX), vec![1, 2, 3]);
        // At 75%, 1.33×: nothing is worth copying.
        let closed = vec![file(1, 75), file(2, 75), file(3, 75)];
        assert!(chosen(closed, &none, u64::MAX).is_empty());
        // Nor is a file more than 71% live (2.5 bytes copied per byte freed), however far over the
        // target dead bytes compaction cannot free (in the files being filled) keep the generation.
        for live_bytes in [1000, 990, 720] {
            let closed = vec![FileUse { seq: 1, len: 1000, live_bytes }];
            let usage = GenerationUse { closed, held: 10_000, live: 1_000 };
            assert!(files_to_compact(usage, &none, u64::MAX).is_empty(), "{live_bytes} of 1,000 live");
        }
        let closed = vec![FileUse { seq: 1, len: 1000, live_bytes: 700 }];
        assert_eq!(files_to_compact(GenerationUse { closed, held: 10_000, live: 1_000 }, &none, u64::MAX).len(), 1);
        // A file left alone (it holds a damaged batch) is skipped, not counted as emptied: 1,750
        // live of 4,000, and all three others go without reaching 1.4×.
        let closed = vec![file(1, 10), file(2, 55), file(3, 55), file(4, 55)];
        assert_eq!(chosen(closed.clone(), &BTreeSet::from([1]), u64::MAX), vec![2, 3, 4]);
        // The budget bounds the live bytes moved, but one file always goes.
        assert_eq!(chosen(closed.clone(), &none, 650), vec![1, 2]);
        assert_eq!(chosen(closed, &none, 0), vec![1]);
    }

    /// Files each more than half live are not compacted for themselves, but together they may hold
    /// the live data more than 1.4 times over: then the emptiest are compacted until they do not.
    #[test]
    fn compaction_brings_files_more_than_half_live_back_under_the_space_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        create(&store, "bulk", 1);
        let filler = "f".repeat(900);
        let mut kept = Vec::new();
        // Five of every eight batches stay: about 62% of each file once the bulk topic goes.
        for i in 0..96 {
            if [true, true, true, false, false, true, true, false][i % 8] {
                let v = format!("k-{i}-{filler}");
                produce(&store, "keep", 0, &[v.as_str()], 2);
                kept.push(v);
            } else {
                produce(&store, "bulk", 0, &[filler.as_str()], 2);
            }
        }
        store.apply(&[Some(&Command::DeleteTopic { name: name("bulk") })], Bytes::from_static(b"3")).unwrap();
        while store.reclaim(1000).unwrap() > 0 {}
        let space_percent = |store: &TopicStore| {
            let usage = store.inner.files.usage(0).unwrap();
            assert!(usage.closed.len() >= 6, "{usage:?}");
            (usage.held * 100 / usage.live, usage.closed)
        };
        let (before, closed) = space_percent(&store);
        assert!(before > COMPACT_MAX_SPACE_PERCENT, "{before}% of the live bytes");
        assert!(
            closed.iter().all(|f| f.live_bytes * 100 > f.len * COMPACT_MAX_LIVE_PERCENT),
            "no file is sparse by itself: {closed:?}"
        );

        let summary = store.compact(u64::MAX).unwrap();
        assert!(summary.files > 0, "{summary:?}");
        let (after, _) = space_percent(&store);
        assert!(after <= COMPACT_MAX_SPACE_PERCENT, "{after}% of the live bytes after {summary:?}");
        assert_eq!(values(&store, "keep"), kept);
        assert_eq!(store.compact(u64::MAX).unwrap(), CompactionSummary::default(), "under the target: no more copying");
    }

    /// Compaction rounds, as a node's reclaimer runs them, until one has nothing to move and asks
    /// for no more; at most 40 (`endless` says why more would be wrong).
    fn compact_until_done(store: &TopicStore, endless: &str) -> Vec<CompactionSummary> {
        let mut rounds = Vec::new();
        loop {
            let s = store.compact(u64::MAX).unwrap();
            rounds.push(s);
            if !s.more && s.batches == 0 {
                return rounds;
            }
            assert!(rounds.len() < 40, "{endless}: {rounds:?}");
        }
    }

    /// A chosen file that can never be emptied (its count stays above what references name) does
    /// not keep rounds coming back to back: once a whole pass moves nothing, the round says so.
    #[test]
    fn a_pass_that_moves_nothing_does_not_ask_for_more() {
        let dir = tempfile::tempdir().unwrap();
        let opts = TopicStoreOptions { compact_scan_refs: 3, ..small_files() };
        let store = open_store_with(dir.path(), &opts);
        create(&store, "keep", 0);
        let kept = interleave_then_delete(&store, "bulk", "keep", "k", 64);
        let stuck = store.inner.files.usage(0).unwrap().closed[0].seq;
        store.inner.files.count_phantom_live(stuck, 100);
        compact_until_done(&store, "rounds keep asking for more");
        let left = store.inner.files.usage(0).unwrap().closed;
        assert!(left.iter().any(|f| f.seq == stuck), "the stuck file stays: {left:?}");
        assert!(left.iter().all(|f| f.seq == stuck || f.live_bytes == f.len), "the rest is compacted: {left:?}");
        assert_eq!(values(&store, "keep"), kept);
    }

    /// Copies given up before their swap are looked at again: the cursor goes back to the first of
    /// them unless the next round starts before it anyway.
    #[test]
    fn a_scan_cursor_rewinds_only_to_an_earlier_reference() {
        let key = |n: u8| sled::IVec::from(&[n][..]);
        let mut c = ScanCursor { generation: 1, next: None, pass_moved: false };
        c.rewind(1, key(5));
        assert_eq!(c.start(1), sled::IVec::from(&[][..]), "from the first reference already");
        c = ScanCursor { generation: 1, next: Some(key(5)), pass_moved: false };
        c.rewind(1, key(7));
        assert_eq!(c.start(1), key(5));
        c.rewind(1, key(3));
        assert_eq!(c.start(1), key(3));
        // Another generation's cursor starts from the first; rewinding sets it for this one.
        assert_eq!(c.start(2), sled::IVec::from(&[][..]));
        c.rewind(2, key(9));
        assert_eq!((c.generation, c.start(2)), (2, key(9)));
    }

    /// A round looks at a bounded stretch of the references and the next goes on from there: no
    /// round scans a large store whole, and a few rounds still compact everything.
    #[test]
    fn compaction_rounds_scan_a_bounded_stretch_of_references_and_go_on_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let opts = TopicStoreOptions { compact_scan_refs: 3, ..small_files() };
        let store = open_store_with(dir.path(), &opts);
        create(&store, "keep", 0);
        let kept = interleave_then_delete(&store, "bulk", "keep", "k", 64);
        assert_eq!(kept.len(), 16);
        let before = batch_file_paths(dir.path()).len();
        let rounds = compact_until_done(&store, "a round that starts from the first reference again never ends");
        assert!(rounds.iter().all(|s| s.batches <= 3), "a round moves only from the stretch it looked at: {rounds:?}");
        assert!(rounds[0].more, "{rounds:?}");
        assert!(rounds.len() >= 6, "16 references, 3 a round: {rounds:?}");
        let freed: usize = rounds.iter().map(|s| s.files).sum();
        assert!(freed >= before - 2, "{freed} of {before} files freed over {rounds:?}");
        assert_eq!(values(&store, "keep"), kept);
        drop(store);
        let store = open_store_with(dir.path(), &opts);
        assert!(store.lost_data().unwrap().is_none());
        assert_eq!(values(&store, "keep"), kept);
    }

    /// A damaged batch is reported, not copied: its file stays (readers report it), later rounds
    /// leave it alone, and the other sparse files are still compacted.
    #[test]
    fn compaction_leaves_a_file_with_a_damaged_batch_alone_and_compacts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        interleave_then_delete(&store, "bulk", "keep", "k", 16);
        store.flush_durable().unwrap();
        let sparse = store.inner.files.usage(0).unwrap().closed;
        assert!(sparse.iter().all(|f| f.live_bytes * 100 <= f.len * COMPACT_MAX_LIVE_PERCENT), "{sparse:?}");
        let victim = sparse.first().expect("a sparse file").seq;
        // Damage the payload of the first live batch in that file (same length, same stored crc).
        let r = store
            .inner
            .db
            .open_tree(tree_names(0).1)
            .unwrap()
            .iter()
            .map(|kv| BatchRef::decode(&|| "ref".into(), &kv.unwrap().1).unwrap())
            .find(|r| r.file == victim)
            .unwrap();
        let path = store.inner.files.dir().join(format!("{victim:016x}.batches"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(r.end() - 2) as usize] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();

        let summary = store.compact(u64::MAX).unwrap();
        assert!(path.exists(), "the file holding the damaged batch stays");
        assert_eq!(summary.files, sparse.len() - 1, "the other sparse files go: {summary:?}");
        assert_eq!(store.compact(u64::MAX).unwrap(), CompactionSummary::default(), "and it is not tried again");
        let err = store.read("keep", 0, 0, 1000, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("crc32 mismatch"), "readers are told: {err}");
    }

    /// A reader that may hold a reference compaction just replaced (one holding `relocation`, as
    /// `read` does from lookup to read) keeps the old file until it is done.
    #[test]
    fn compaction_keeps_emptied_files_until_readers_that_may_name_them_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        let kept = interleave_then_delete(&store, "bulk", "keep", "k", 32);
        let before = batch_file_paths(dir.path());
        let reading = store.inner.relocation.read().unwrap();
        let compaction = {
            let store = store.clone();
            std::thread::spawn(move || store.compact(u64::MAX).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!compaction.is_finished(), "compaction waits for the reader");
        assert!(before.iter().all(|p| p.exists()), "no file goes while a reader may still name it");
        drop(reading);
        let summary = compaction.join().unwrap();
        assert!(summary.files >= 2, "{summary:?}");
        assert!(before.iter().filter(|p| !p.exists()).count() == summary.files);
        assert_eq!(values(&store, "keep"), kept);
    }

    /// A caller on an async runtime is told to read elsewhere instead of waiting while files are
    /// being released (`try_read` is `None`), and reads as usual otherwise.
    #[test]
    fn try_read_never_waits_for_files_being_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        create(&store, "t", 0);
        produce(&store, "t", 0, &["a", "b"], 1);
        let releasing = store.inner.relocation.write().unwrap();
        assert!(store.try_read("t", 0, 0, 10, 1 << 20).is_none());
        drop(releasing);
        let got = store.try_read("t", 0, 0, 10, 1 << 20).expect("nothing is being released").unwrap();
        assert_eq!(got.records.len(), 2);
    }

    /// The same for reclaim: a fetch that found a deleted topic's references before the deletion
    /// reads them whole; the files go once it is done.
    #[test]
    fn reclaim_keeps_emptied_files_until_readers_that_may_name_them_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "gone", 0);
        for _ in 0..20 {
            produce(&store, "gone", 0, &["f".repeat(900).as_str()], 1);
        }
        store.apply(&[Some(&Command::DeleteTopic { name: name("gone") })], Bytes::from_static(b"3")).unwrap();
        let before = batch_file_paths(dir.path());
        assert!(before.len() >= 2);
        let reading = store.inner.relocation.read().unwrap();
        let reclaim = {
            let store = store.clone();
            std::thread::spawn(move || store.reclaim(1000).unwrap())
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!reclaim.is_finished(), "reclaim waits for the reader");
        assert!(before.iter().all(|p| p.exists()), "no file goes while a reader may still name it");
        drop(reading);
        assert_eq!(reclaim.join().unwrap(), 20);
        assert!(before.iter().all(|p| !p.exists()), "then they all go");
    }

    /// Readers never see a reference whose file compaction released, nor a wrong value.
    #[test]
    fn reads_running_through_compactions_always_get_whole_batches() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &small_files());
        create(&store, "keep", 0);
        let expected = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, expected, stop) = (store.clone(), expected.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let known = expected.lock().unwrap().clone();
                    let got = match store.read("keep", 0, 0, 100_000, usize::MAX) {
                        Ok(f) => f.records.iter().map(|(_, r)| String::from_utf8(r.value.to_vec()).unwrap()).collect(),
                        Err(StoreError::OffsetOutOfRange { .. }) => Vec::new(),
                        Err(e) => panic!("read during compaction: {e}"),
                    };
                    assert!(got.len() >= known.len() && got[..known.len()] == known[..], "{got:?} against {known:?}");
                    reads += 1;
                }
                reads
            })
        };
        let mut freed = 0;
        for round in 0..6 {
            let kept = interleave_then_delete(&store, &format!("bulk{round}"), "keep", &format!("r{round}"), 32);
            expected.lock().unwrap().extend(kept);
            freed += store.compact(u64::MAX).unwrap().files;
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(freed >= 12, "{freed} files freed");
        assert!(reads > 0);
        assert_eq!(values(&store, "keep"), *expected.lock().unwrap());
    }

    #[test]
    fn a_damaged_byte_in_an_unsynced_batch_is_found_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        store.flush_durable().unwrap();
        produce(&store, "t", 0, &["a value long enough to damage"], 2);
        store.inner.db.flush().unwrap();
        drop(store);
        // Same length, same stored crc: only the payload's checksum can tell.
        let file = batch_file_paths(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(&file, &bytes).unwrap();

        let store = open_store(dir.path());
        let reason = store.lost_data().unwrap().expect("the damaged batch is found at open");
        assert!(reason.contains("crc32 mismatch"), "{reason}");
    }

    #[test]
    fn batches_cut_short_by_a_power_loss_are_found_at_open_and_the_store_rolls_back_to_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&store, "t", 0, &["a", "b"], 2);
        let manifest = store.capture_snapshot().unwrap();
        store.flush_durable().unwrap();
        store.pin_snapshot(&manifest).unwrap();
        produce(&store, "t", 0, &["c"], 3);
        produce(&store, "t", 0, &["d"], 4);
        store.inner.db.flush().unwrap();
        drop(store);
        // A power loss kept sled's references but not the last bytes written to the file.
        let file = batch_file_paths(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 3).unwrap();

        let store = open_store(dir.path());
        let reason = store.lost_data().unwrap().expect("the cut batch is found at open");
        assert!(reason.contains("cannot read"), "{reason}");
        store.pin_snapshot(&manifest).unwrap();
        let rebuilt = store.rebuild_from(Some(&manifest)).unwrap().unwrap();
        assert!(store.lost_data().unwrap().is_none());
        assert_eq!(rebuilt.applied(), manifest.applied());
        assert_eq!(store.applied().unwrap(), manifest.applied());
        let r = store.read("t", 0, 0, 10, 1 << 20).unwrap();
        assert_eq!(r.end_offset, 2);
        let vals: Vec<_> = r.records.iter().map(|(_, r)| r.value.clone()).collect();
        assert_eq!(vals, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        // The log replays what came after; offsets continue from the snapshot.
        assert!(matches!(produce(&store, "t", 0, &["c"], 3), CommandResponse::Produced { base_offset: 2, .. }));
        drop(store);
        let store = open_store(dir.path());
        assert!(store.lost_data().unwrap().is_none());
        assert_eq!(store.read("t", 0, 0, 10, 1 << 20).unwrap().records.len(), 3);

        // No snapshot at all: back to the empty store, and the log replays from its start.
        let store2_dir = tempfile::tempdir().unwrap();
        let s2 = open_store(store2_dir.path());
        s2.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&s2, "t", 0, &["a"], 2);
        s2.inner.db.flush().unwrap();
        drop(s2);
        let file = batch_file_paths(store2_dir.path()).pop().unwrap();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(0).unwrap();
        let s2 = open_store(store2_dir.path());
        assert!(s2.lost_data().unwrap().is_some());
        assert!(s2.rebuild_from(None).unwrap().is_none());
        assert_eq!(s2.applied().unwrap(), None);
        assert!(s2.list_topics().unwrap().is_empty());
    }

    fn idem(store: &TopicStore, topic: &str, p: u32, pid: u64, seq: u64, v: &str) -> CommandResponse {
        let cmd = Command::Produce {
            topic: name(topic),
            partition: p,
            records: batch_of(vec![rec(v)]),
            producer: Some(ProducerSeq { producer_id: pid, sequence: seq }),
        };
        store.apply(&[Some(&cmd)], Bytes::from_static(b"i")).unwrap().remove(0)
    }

    fn new_producer(store: &TopicStore) -> u64 {
        match store.apply(&[Some(&Command::InitProducerId)], Bytes::from_static(b"p")).unwrap().remove(0) {
            CommandResponse::ProducerIdAssigned { producer_id } => producer_id,
            other => panic!("{other:?}"),
        }
    }

    fn code(r: &CommandResponse) -> Option<ErrorCode> {
        match r {
            CommandResponse::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn idempotent_producer_retries_get_original_offsets_and_gaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 2, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        let a = new_producer(&store);
        let b = new_producer(&store);
        assert_ne!(a, b);
        assert!(a >= 1 && b >= 1, "0 means not idempotent on the wire");

        assert_eq!(
            idem(&store, "t", 0, a, 0, "a0"),
            CommandResponse::Produced { base_offset: 0, count: 1, duplicate: false }
        );
        assert_eq!(
            idem(&store, "t", 0, b, 0, "b0"),
            CommandResponse::Produced { base_offset: 1, count: 1, duplicate: false }
        );
        assert_eq!(
            idem(&store, "t", 0, a, 1, "a1"),
            CommandResponse::Produced { base_offset: 2, count: 1, duplicate: false }
        );
        // A retry of an acknowledged batch: its original offsets, nothing written.
        assert_eq!(
            idem(&store, "t", 0, a, 0, "a0"),
            CommandResponse::Produced { base_offset: 0, count: 1, duplicate: true }
        );
        assert_eq!(store.partition_offsets("t").unwrap()[0].end_offset, 3);
        // Sequences are per partition.
        assert_eq!(
            idem(&store, "t", 1, a, 0, "x"),
            CommandResponse::Produced { base_offset: 0, count: 1, duplicate: false }
        );
        // A gap is refused and writes nothing; the expected sequence still works afterwards.
        assert_eq!(code(&idem(&store, "t", 0, a, 5, "gap")), Some(ErrorCode::OutOfOrderSequenceNumber));
        assert_eq!(store.partition_offsets("t").unwrap()[0].end_offset, 3);
        assert_eq!(
            idem(&store, "t", 0, a, 2, "a2"),
            CommandResponse::Produced { base_offset: 3, count: 1, duplicate: false }
        );
        // Beyond the remembered window: refused, not written again.
        for seq in 3..10 {
            idem(&store, "t", 0, a, seq, "more");
        }
        assert_eq!(code(&idem(&store, "t", 0, a, 1, "old")), Some(ErrorCode::DuplicateSequenceNumber));
        // An id never handed out.
        assert_eq!(code(&idem(&store, "t", 0, 999, 0, "who")), Some(ErrorCode::UnknownProducerId));
        assert_eq!(code(&idem(&store, "t", 0, 0, 0, "zero")), Some(ErrorCode::UnknownProducerId));
    }

    #[test]
    fn producer_state_survives_reopen_and_snapshot_install() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let pid;
        {
            let a = open_store(a_dir.path());
            let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
            a.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
            pid = new_producer(&a);
            idem(&a, "t", 0, pid, 0, "v0");
            idem(&a, "t", 0, pid, 1, "v1");
            a.flush_durable().unwrap();
        }
        let a = open_store(a_dir.path());
        assert_eq!(
            idem(&a, "t", 0, pid, 1, "v1"),
            CommandResponse::Produced { base_offset: 1, count: 1, duplicate: true }
        );
        let (_, buf) = a.export_snapshot(&a.capture_snapshot().unwrap(), Vec::new()).unwrap();
        let b = open_store(b_dir.path());
        b.import_snapshot(&buf[..], "snap").unwrap();
        assert_eq!(
            idem(&b, "t", 0, pid, 0, "v0"),
            CommandResponse::Produced { base_offset: 0, count: 1, duplicate: true }
        );
        assert_eq!(
            idem(&b, "t", 0, pid, 2, "v2"),
            CommandResponse::Produced { base_offset: 2, count: 1, duplicate: false }
        );
        // The id counter came along too: a new producer gets a fresh id.
        assert!(new_producer(&b) > pid);
    }

    fn bounded(max_producer_states: usize) -> TopicStoreOptions {
        TopicStoreOptions { max_producer_states, ..TopicStoreOptions::default() }
    }

    fn idem_cmd(pid: u64, seq: u64) -> Command {
        Command::Produce {
            topic: name("t"),
            partition: 0,
            records: batch_of(vec![rec(&format!("{pid}/{seq}"))]),
            producer: Some(ProducerSeq { producer_id: pid, sequence: seq }),
        }
    }

    fn set_version(store: &TopicStore, version: u32) -> Result<Vec<CommandResponse>, StoreError> {
        store.apply(&[Some(&Command::SetApplyVersion { version })], Bytes::from_static(b"v"))
    }

    /// Before the log moves to version 2, producer states are never evicted and a producer may
    /// start a partition at any sequence (the rules nodes of older builds still apply); the move
    /// itself applies the bound, and a version this build does not know stops apply.
    #[test]
    fn producer_bounds_start_at_the_apply_version_entry_not_with_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &bounded(2));
        assert_eq!(store.apply_version().unwrap(), crate::apply_version::LEGACY_APPLY_VERSION);
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        let pids: Vec<u64> = (0..3).map(|_| new_producer(&store)).collect();
        for &pid in &pids {
            idem(&store, "t", 0, pid, 0, "v");
        }
        assert_eq!(producers_by_age(&store).len(), 3, "no bound at version 1");
        let fresh = new_producer(&store);
        assert!(matches!(idem(&store, "t", 0, fresh, 4, "v"), CommandResponse::Produced { duplicate: false, .. }));
        assert_eq!(producers_by_age(&store).len(), 4);

        assert_eq!(set_version(&store, 2).unwrap(), vec![CommandResponse::ApplyVersionSet { version: 2 }]);
        assert_eq!(store.apply_version().unwrap(), 2);
        // Restamped in key order, then down to the bound: the two highest producer ids stay.
        let held: Vec<u64> = producers_by_age(&store).iter().map(|k| k.0).collect();
        assert_eq!(held, vec![pids[2], fresh]);
        let other = new_producer(&store);
        assert_eq!(code(&idem(&store, "t", 0, other, 1, "v")), Some(ErrorCode::UnknownProducerId));
        // Going back is a no-op; a version this build does not know is an error, not a skip.
        assert_eq!(set_version(&store, 1).unwrap(), vec![CommandResponse::ApplyVersionSet { version: 2 }]);
        let err = set_version(&store, crate::apply_version::APPLY_VERSION + 1).unwrap_err().to_string();
        assert!(err.contains("upgrade"), "{err}");
        // The version survives a reopen.
        store.flush_durable().unwrap();
        drop(store);
        assert_eq!(open_store_with(dir.path(), &bounded(2)).apply_version().unwrap(), 2);
    }

    /// The producer states a store holds, least recently used first.
    fn producers_by_age(store: &TopicStore) -> Vec<ProducerKey> {
        let table = store.inner.producers.lock().unwrap();
        let mut v: Vec<_> = table.states.iter().map(|(k, s)| (s.last_used, *k)).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }

    #[test]
    fn past_the_bound_the_least_recently_used_producer_states_go_and_their_retries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store_with(dir.path(), &bounded(8));
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        set_version(&store, 2).unwrap();
        let pids: Vec<u64> = (0..9).map(|_| new_producer(&store)).collect();
        for &pid in &pids[..8] {
            assert!(matches!(idem(&store, "t", 0, pid, 0, "v"), CommandResponse::Produced { duplicate: false, .. }));
        }
        assert_eq!(producers_by_age(&store).len(), 8, "at the bound, nothing is evicted");
        // The oldest id is used again: it is now the most recently used, not the first to go.
        assert!(matches!(idem(&store, "t", 0, pids[0], 1, "v"), CommandResponse::Produced { duplicate: false, .. }));
        // A ninth state: down to 7/8 of the bound, the two least recently used (pids 1 and 2).
        idem(&store, "t", 0, pids[8], 0, "v");
        let held: Vec<u64> = producers_by_age(&store).iter().map(|k| k.0).collect();
        assert_eq!(held, [&pids[3..8], &[pids[0], pids[8]]].concat());
        // An evicted producer's retry cannot be told from a new batch: refused, nothing written.
        let end = store.partition_offsets("t").unwrap()[0].end_offset;
        let refused = idem(&store, "t", 0, pids[1], 1, "v");
        assert_eq!(code(&refused), Some(ErrorCode::UnknownProducerId), "{refused:?}");
        assert_eq!(store.partition_offsets("t").unwrap()[0].end_offset, end);
        // Held states still answer retries with their offsets.
        assert!(matches!(idem(&store, "t", 0, pids[0], 1, "v"), CommandResponse::Produced { duplicate: true, .. }));
        assert!(matches!(idem(&store, "t", 0, pids[3], 0, "v"), CommandResponse::Produced { duplicate: true, .. }));
    }

    /// Eviction is part of the replicated state: a node that got the same entries in other apply
    /// calls, one restarted (before and after the move to version 2), and one installed from a
    /// snapshot must hold the same states.
    #[test]
    fn producer_eviction_is_the_same_however_entries_are_grouped_and_after_reopen_or_snapshot() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (a, b) = (open_store_with(dirs[0].path(), &bounded(8)), open_store_with(dirs[1].path(), &bounded(8)));
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        let init = Command::InitProducerId;
        let mut first: Vec<Command> = vec![create];
        first.extend((0..12).map(|_| init.clone()));
        // Producers 1..=12 write in an order that is not their id order, some twice.
        let order = [5u64, 3, 9, 1, 12, 7, 3, 2, 11, 5, 8, 4, 10, 6];
        let mut seqs = HashMap::new();
        for &pid in &order {
            let seq = seqs.entry(pid).or_insert(0u64);
            first.push(idem_cmd(pid, *seq));
            *seq += 1;
        }
        // Version 1 first (what older builds applied): a gets the entries one per apply call and
        // restarts halfway; b gets them all in one call. Their stamps differ; no state is evicted.
        let half = first.len() / 2;
        for c in &first[..half] {
            a.apply(&[Some(c)], Bytes::from_static(b"a")).unwrap();
        }
        a.flush_durable().unwrap();
        drop(a);
        let a = open_store_with(dirs[0].path(), &bounded(8));
        for c in &first[half..] {
            a.apply(&[Some(c)], Bytes::from_static(b"a")).unwrap();
        }
        let all: Vec<Option<&Command>> = first.iter().map(Some).collect();
        b.apply(&all, Bytes::from_static(b"b")).unwrap();
        assert_eq!(producers_by_age(&a).len(), 12);
        assert_eq!(producers_by_age(&b).len(), 12);
        // The move to version 2 restamps by key and evicts down to 7: the same on both.
        set_version(&a, 2).unwrap();
        set_version(&b, 2).unwrap();
        assert_eq!(producers_by_age(&a), producers_by_age(&b));
        assert_eq!(producers_by_age(&a).iter().map(|k| k.0).collect::<Vec<_>>(), (6..=12).collect::<Vec<u64>>());
        // More in different groupings: 5 then 3 touched again, then 4 new producers (2 evictions).
        let init2: Vec<Command> = (0..4).map(|_| init.clone()).collect();
        let second: Vec<Command> = [idem_cmd(12, seqs[&12]), idem_cmd(6, seqs[&6])]
            .into_iter()
            .chain(init2)
            .chain((13..=16).map(|p| idem_cmd(p, 0)))
            .collect();
        for c in &second {
            a.apply(&[Some(c)], Bytes::from_static(b"a")).unwrap();
        }
        let all: Vec<Option<&Command>> = second.iter().map(Some).collect();
        b.apply(&all, Bytes::from_static(b"b")).unwrap();
        assert_eq!(producers_by_age(&a), producers_by_age(&b));
        // 7 + 4 new, each 9th evicting down to 7: 7.
        assert_eq!(producers_by_age(&a).len(), 7);
        for p in [12, 6] {
            seqs.insert(p, seqs[&p] + 1);
        }

        // a restarts again; c is installed from b's snapshot; then all three apply more.
        a.flush_durable().unwrap();
        drop(a);
        let a = open_store_with(dirs[0].path(), &bounded(8));
        let c = open_store_with(dirs[2].path(), &bounded(8));
        let (_, snap) = b.export_snapshot(&b.capture_snapshot().unwrap(), Vec::new()).unwrap();
        c.import_snapshot(&snap[..], "snap").unwrap();
        let held = producers_by_age(&b);
        let oldest = held[0].0;
        let mut more = vec![idem_cmd(oldest, seqs.get(&oldest).copied().unwrap_or(1))];
        more.extend((0..2).map(|_| init.clone()));
        more.push(idem_cmd(17, 0));
        more.push(idem_cmd(18, 0));
        for s in [&a, &b, &c] {
            for cmd in &more {
                s.apply(&[Some(cmd)], Bytes::from_static(b"m")).unwrap();
            }
        }
        let after = producers_by_age(&b);
        assert_eq!(after.len(), 7, "the second new state made 9: down to 7");
        assert_eq!(after.last().map(|k| k.0), Some(18));
        assert!(after.iter().any(|k| k.0 == held[0].0), "the state just touched stays");
        assert_eq!(producers_by_age(&a), after, "the restarted node");
        assert_eq!(producers_by_age(&c), after, "the node installed from a snapshot");
    }

    fn produce_at(store: &TopicStore, ts: i64, n: usize) -> u64 {
        let records = batch_of((0..n).map(|i| Record { timestamp_ms: ts, ..rec(&format!("v{i}")) }).collect());
        let cmd = Command::Produce { topic: name("r"), partition: 0, records, producer: None };
        match store.apply(&[Some(&cmd)], Bytes::from_static(b"x")).unwrap().remove(0) {
            CommandResponse::Produced { base_offset, .. } => base_offset,
            other => panic!("{other:?}"),
        }
    }

    fn truncate(store: &TopicStore, new_start: u64) -> CommandResponse {
        let id = store.topic("r").unwrap().unwrap().id;
        let cmd = Command::TruncatePrefix { topic: name("r"), topic_id: id, partition: 0, new_start };
        store.apply(&[Some(&cmd)], Bytes::from_static(b"t")).unwrap().remove(0)
    }

    #[test]
    fn retention_drops_whole_old_batches_and_keeps_the_rest_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("r"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce_at(&store, 1_000, 3); // offsets 0..3, old
        produce_at(&store, 2_000, 2); // 3..5, old
        produce_at(&store, 9_000, 4); // 5..9, recent
                                      // By time: at now=10_000 with retention 5_000 ms, the first two batches (max ts 1000, 2000) go.
        assert_eq!(store.retention_point("r", 0, 10_000, Some(5_000), None).unwrap(), Some(5));
        assert_eq!(store.retention_point("r", 0, 10_000, Some(60_000), None).unwrap(), None);
        // By bytes: keep at least the limit; with a limit of one batch's size, only the last stays
        // (plus at most one more batch).
        let total = store.partition_offsets("r").unwrap()[0].bytes;
        assert!(total > 0);
        let point = store.retention_point("r", 0, 0, None, Some(1)).unwrap();
        assert_eq!(point, Some(5), "a limit below one batch keeps exactly the newest batch");
        assert_eq!(store.retention_point("r", 0, 0, None, Some(total)).unwrap(), None);

        // A group committed inside the dropped range resumes at the new start.
        let join = Command::JoinGroup {
            group: name("g"),
            member_id: "m".into(),
            topics: vec![name("r")],
            session_timeout_ms: 10_000,
        };
        store.apply(&[Some(&join)], Bytes::from_static(b"j")).unwrap();
        let gen = store.group("g").unwrap().unwrap().generation;
        let commit = Command::CommitOffsets {
            group: name("g"),
            member_id: "m".into(),
            generation: gen,
            offsets: vec![(name("r"), 0, 2)],
        };
        store.apply(&[Some(&commit)], Bytes::from_static(b"c")).unwrap();

        assert_eq!(truncate(&store, 5), CommandResponse::PrefixTruncated { start_offset: 5 });
        let offs = &store.partition_offsets("r").unwrap()[0];
        assert_eq!((offs.start_offset, offs.end_offset), (5, 9));
        assert!(offs.bytes < total);
        assert!(matches!(
            store.read("r", 0, 4, 10, 1 << 20),
            Err(StoreError::OffsetOutOfRange { start: 5, end: 9, .. })
        ));
        let r = store.read("r", 0, 5, 10, 1 << 20).unwrap();
        assert_eq!(r.records.first().map(|(o, _)| *o), Some(5));
        assert_eq!(r.records.len(), 4);
        assert_eq!(store.group("g").unwrap().unwrap().partitions[0].committed, Some(5));
        assert_eq!(store.group_offsets_moved_by_retention(), 1, "counted for the metric");
        // Idempotent, and never backwards.
        assert_eq!(truncate(&store, 3), CommandResponse::PrefixTruncated { start_offset: 5 });
        assert!(matches!(truncate(&store, 100), CommandResponse::Rejected { code: ErrorCode::OffsetOutOfRange, .. }));
        // The dropped batches are deleted from sled by reclaim, and a snapshot starts at the start.
        assert_eq!(store.reclaim(100).unwrap(), 2);
        let (summary, _) = store.export_snapshot(&store.capture_snapshot().unwrap(), Vec::new()).unwrap();
        assert_eq!(summary.batches, 1);
    }

    #[test]
    fn a_retention_cut_applied_with_the_batches_it_drops_counts_them_like_the_leader() {
        let dirs = [(); 2].map(|()| tempfile::tempdir().unwrap());
        let [leader, follower] = [0, 1].map(|i| open_store(dirs[i].path()));
        let create = Command::CreateTopic { name: name("r"), partitions: 1, config: TopicConfig::default() };
        let produce = |ts: i64, n: usize| Command::Produce {
            topic: name("r"),
            partition: 0,
            records: batch_of((0..n).map(|i| Record { timestamp_ms: ts, ..rec(&format!("v{i}")) }).collect()),
            producer: None,
        };
        let id = |s: &TopicStore| s.topic("r").unwrap().unwrap().id;
        let cut = |topic_id: u32, new_start: u64| Command::TruncatePrefix {
            topic: name("r"),
            topic_id,
            partition: 0,
            new_start,
        };
        // The leader applies each entry as it commits; a follower catching up gets them in one call.
        for s in [&leader, &follower] {
            s.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        }
        let (p1, p2, p3) = (produce(1_000, 3), produce(2_000, 2), produce(3_000, 4));
        for cmd in [&p1, &p2, &p3] {
            leader.apply(&[Some(cmd)], Bytes::from_static(b"2")).unwrap();
        }
        leader.apply(&[Some(&cut(id(&leader), 5))], Bytes::from_static(b"3")).unwrap();
        let cut_f = cut(id(&follower), 5);
        follower.apply(&[Some(&p1), Some(&p2), Some(&p3), Some(&cut_f)], Bytes::from_static(b"3")).unwrap();
        let offsets = |s: &TopicStore| s.partition_offsets("r").unwrap()[0].clone();
        assert_eq!(offsets(&follower), offsets(&leader), "same start, end and bytes on both");
        assert_eq!((offsets(&leader).start_offset, offsets(&leader).end_offset), (5, 9));
        let (summary, _) = follower.export_snapshot(&follower.capture_snapshot().unwrap(), Vec::new()).unwrap();
        assert_eq!(summary.batches, 1);

        // A cut inside a batch is refused, the same way everywhere, and changes nothing.
        let inside = leader.apply(&[Some(&cut(id(&leader), 7))], Bytes::from_static(b"4")).unwrap().remove(0);
        assert_eq!(code(&inside), Some(ErrorCode::InvalidRequest), "{inside:?}");
        assert_eq!(offsets(&leader).start_offset, 5);
        // The end offset is a boundary: everything may go.
        let all = leader.apply(&[Some(&cut(id(&leader), 9))], Bytes::from_static(b"5")).unwrap().remove(0);
        assert_eq!(all, CommandResponse::PrefixTruncated { start_offset: 9 });
    }

    #[test]
    fn a_snapshot_manifest_keeps_its_batches_until_a_newer_one_is_pinned() {
        let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let [a, b, c] = [0, 1, 2].map(|i| open_store(dirs[i].path()));
        let create = |n: &str| Command::CreateTopic { name: name(n), partitions: 1, config: TopicConfig::default() };
        a.apply(&[Some(&create("r")), Some(&create("gone"))], Bytes::from_static(b"1")).unwrap();
        produce_at(&a, 1_000, 3); // 0..3
        produce_at(&a, 2_000, 2); // 3..5
        produce_at(&a, 3_000, 4); // 5..9
        produce(&a, "gone", 0, &["g"], 2);
        let m1 = a.capture_snapshot().unwrap();

        // After the snapshot: retention drops two batches, a topic is deleted, more is appended.
        assert_eq!(truncate(&a, 5), CommandResponse::PrefixTruncated { start_offset: 5 });
        let delete = Command::DeleteTopic { name: name("gone") };
        a.apply(&[Some(&delete)], Bytes::from_static(b"3")).unwrap();
        produce_at(&a, 4_000, 1); // 9..10
        assert_eq!(a.reclaim(1000).unwrap(), 0, "everything dropped since is named by the pinned snapshot");

        // So the snapshot still streams whole, at its own index.
        let (summary, buf) = a.export_snapshot(&m1, Vec::new()).unwrap();
        assert_eq!(summary.batches, 4);
        let b_before = b.capture_snapshot().unwrap();
        let installed = b.import_snapshot(&buf[..], "m1").unwrap();
        assert_eq!(installed.applied(), m1.applied());
        let r = b.read("r", 0, 0, 100, 1 << 20).unwrap();
        assert_eq!((r.records.len(), r.end_offset), (9, 9));
        assert_eq!(b.read("gone", 0, 0, 10, 1 << 20).unwrap().records.len(), 1);
        // b's manifest from before the install names a generation it no longer has.
        assert!(matches!(b.export_snapshot(&b_before, Vec::new()), Err(StoreError::SnapshotUnavailable(_))));
        assert!(matches!(b.pin_snapshot(&b_before), Err(StoreError::SnapshotUnavailable(_))));
        assert!(b.export_snapshot(&installed, Vec::new()).is_ok(), "the installed snapshot streams on");

        // A newer snapshot releases them once it is published (pinned alone); until then both are
        // kept. The old manifest is then refused, never streamed with holes.
        let m2 = a.capture_snapshot().unwrap();
        assert_eq!(a.reclaim(1000).unwrap(), 0, "the published snapshot stays pinned until the next is");
        a.pin_snapshot(&m2).unwrap();
        assert_eq!(a.reclaim(1000).unwrap(), 3, "two retained-out batches and the deleted topic's one");
        assert_eq!(a.reclaim(1000).unwrap(), 0);
        assert!(matches!(a.export_snapshot(&m1, Vec::new()), Err(StoreError::SnapshotUnavailable(_))));
        let (summary, buf) = a.export_snapshot(&m2, Vec::new()).unwrap();
        assert_eq!(summary.batches, 2);
        c.import_snapshot(&buf[..], "m2").unwrap();
        let offs = &c.partition_offsets("r").unwrap()[0];
        assert_eq!((offs.start_offset, offs.end_offset), (5, 10));
        assert!(c.topic("gone").unwrap().is_none());
    }

    /// What sled itself holds: the applied position and the batch references of topic `t`.
    fn in_sled(store: &TopicStore) -> (Option<Vec<u8>>, usize) {
        let cur = store.current().unwrap();
        let applied = cur
            .generation
            .meta_tree
            .get(APPLIED_KEY)
            .unwrap()
            .map(|v| checked::open(&|| "applied".into(), &v).unwrap().to_vec());
        (applied, cur.generation.records.len())
    }

    #[test]
    fn produce_applies_share_one_transaction_and_readers_see_them_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("t"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(&[1])).unwrap();
        assert_eq!(in_sled(&store), (Some(vec![1]), 0), "anything but a produce commits at once");
        for (i, v) in ["a", "b", "c"].into_iter().enumerate() {
            produce(&store, "t", 0, &[v], 2 + i as u8);
        }
        // Deferred: sled is still at the create, but every reader sees the three batches.
        assert_eq!(in_sled(&store), (Some(vec![1]), 0));
        assert_eq!(store.applied().unwrap(), Some(Bytes::from_static(&[4])));
        let r = store.read("t", 0, 1, 10, 1 << 20).unwrap();
        let vals: Vec<_> = r.records.iter().map(|(o, r)| (*o, r.value.clone())).collect();
        assert_eq!(vals, vec![(1, Bytes::from_static(b"b")), (2, Bytes::from_static(b"c"))]);
        assert_eq!(store.retention_point("t", 0, 0, None, Some(1)).unwrap(), Some(2), "sizes deferred batches too");

        // A retention cut commits what waits first, so it sizes the batches it drops from sled.
        let bytes = store.partition_offsets("t").unwrap()[0].bytes;
        let id = store.topic("t").unwrap().unwrap().id;
        let cut = Command::TruncatePrefix { topic: name("t"), topic_id: id, partition: 0, new_start: 2 };
        assert_eq!(
            store.apply(&[Some(&cut)], Bytes::from_static(&[5])).unwrap(),
            vec![CommandResponse::PrefixTruncated { start_offset: 2 }]
        );
        assert_eq!(in_sled(&store), (Some(vec![5]), 3));
        let after = store.partition_offsets("t").unwrap()[0].bytes;
        assert!(after > 0 && after < bytes / 2, "two of three batches dropped: {bytes} -> {after}");

        // At most MAX_DEFERRED_APPLIES calls wait; then they commit together.
        for _ in 1..MAX_DEFERRED_APPLIES {
            produce(&store, "t", 0, &["x"], 6);
            assert_eq!(in_sled(&store).1, 3);
        }
        produce(&store, "t", 0, &["x"], 6);
        assert_eq!(in_sled(&store), (Some(vec![6]), 3 + MAX_DEFERRED_APPLIES));

        // A snapshot names only what sled holds; one taken now holds the deferred batch too.
        produce(&store, "t", 0, &["last"], 7);
        let manifest = store.capture_snapshot().unwrap();
        let (summary, _) = store.export_snapshot(&manifest, Vec::new()).unwrap();
        assert_eq!(summary.batches, 2 + MAX_DEFERRED_APPLIES as u64);

        // A clean close commits what waits; the store reopens at the last applied position.
        produce(&store, "t", 0, &["after the snapshot"], 8);
        drop(store);
        let store = open_store(dir.path());
        assert_eq!(store.applied().unwrap(), Some(Bytes::from_static(&[8])));
        let end = store.partition_offsets("t").unwrap()[0].end_offset;
        let r = store.read("t", 0, end - 1, 10, 1 << 20).unwrap();
        assert_eq!(r.records[0].1.value, Bytes::from_static(b"after the snapshot"));
    }

    /// A commit between a reader's copy of the uncommitted references and its sled read leaves some
    /// in both, and sled may also hold newer ones: the reader gets each once, in key order.
    #[test]
    fn merged_refs_yield_the_union_once_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        let tree = db.open_tree("r").unwrap();
        let k = |i: u64| sled::IVec::from(&batch::key(1, 0, i)[..]);
        for i in [1, 3, 4, 6] {
            tree.insert(k(i), &i.to_be_bytes()).unwrap();
        }
        let copied: Vec<_> =
            [2u64, 3, 4, 5, 7].iter().map(|&i| (k(i), sled::IVec::from(&i.to_be_bytes()[..]))).collect();
        let merged =
            MergedRefs { committed: tree.range(k(0)..k(100)).peekable(), uncommitted: copied.into_iter().peekable() };
        let keys: Vec<u64> = merged.map(|r| batch::parse_key(&r.unwrap().0).unwrap().2).collect();
        assert_eq!(keys, vec![1, 2, 3, 4, 5, 6, 7]);
    }

    /// Commits deferred applies to sled, for a test that looks at sled itself.
    fn commit(store: &TopicStore) {
        let _apply = store.inner.apply_lock.lock().unwrap();
        store.inner.commit_deferred(&store.current().unwrap().generation).unwrap();
    }

    /// Every stored batch of a store: (key, stored value) in key order.
    fn stored_batches(store: &TopicStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        commit(store);
        let cur = store.current().unwrap();
        let resolve = |v: &[u8]| {
            let r = BatchRef::decode(&|| "ref".into(), v).unwrap();
            store.inner.files.read(&|| "batch".into(), &r).unwrap()
        };
        cur.generation.records.iter().map(|kv| kv.map(|(k, v)| (k.to_vec(), resolve(&v))).unwrap()).collect()
    }

    /// The bytes of every stored batch of a store (what its partitions' byte counts add up to).
    fn held_bytes(store: &TopicStore) -> u64 {
        stored_batches(store).iter().map(|(_, v)| v.len() as u64).sum()
    }

    fn small_produce(topic: &str, p: u32, v: &str, producer: Option<ProducerSeq>) -> Command {
        Command::Produce { topic: name(topic), partition: p, records: batch_of(vec![rec(v)]), producer }
    }

    /// The produce commands of one entry are stored as one batch per partition (one sled value, not
    /// one per request), and everything a client sees is as if each had its own entry: offsets,
    /// answers, idempotent retries and reads.
    #[test]
    fn the_produce_commands_of_one_entry_are_stored_as_one_batch_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("m"), partitions: 2, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        let pid = match store.apply(&[Some(&Command::InitProducerId)], Bytes::from_static(b"2")).unwrap().remove(0) {
            CommandResponse::ProducerIdAssigned { producer_id } => producer_id,
            other => panic!("{other:?}"),
        };
        let seq = |sequence| Some(ProducerSeq { producer_id: pid, sequence });
        let entry = Command::Batch(vec![
            small_produce("m", 0, "a", seq(0)),
            small_produce("m", 1, "x", None),
            small_produce("m", 0, "b", seq(1)),
            small_produce("m", 0, "b", seq(1)), // a retry inside the same entry
            small_produce("m", 0, "c", seq(3)), // a gap: refused, changes nothing
            small_produce("m", 1, "y", None),
            small_produce("m", 0, "d", seq(2)),
        ]);
        let resp = store.apply(&[Some(&entry)], Bytes::from_static(b"3")).unwrap();
        let [CommandResponse::Batch(answers)] = resp.as_slice() else { panic!("{resp:?}") };
        let produced = |base_offset| CommandResponse::Produced { base_offset, count: 1, duplicate: false };
        assert_eq!(answers[0], produced(0));
        assert_eq!(answers[1], produced(0));
        assert_eq!(answers[2], produced(1));
        assert_eq!(answers[3], CommandResponse::Produced { base_offset: 1, count: 1, duplicate: true });
        assert!(matches!(&answers[4], CommandResponse::Rejected { code: ErrorCode::OutOfOrderSequenceNumber, .. }));
        assert_eq!(answers[5], produced(1));
        assert_eq!(answers[6], produced(2));
        assert_eq!(stored_batches(&store).len(), 2, "one stored batch per partition");
        let vals = |p| -> Vec<(u64, Bytes)> {
            store.read("m", p, 0, 100, 1 << 20).unwrap().records.into_iter().map(|(o, r)| (o, r.value)).collect()
        };
        assert_eq!(vals(0), vec![(0, Bytes::from("a")), (1, Bytes::from("b")), (2, Bytes::from("d"))]);
        assert_eq!(vals(1), vec![(0, Bytes::from("x")), (1, Bytes::from("y"))]);
        let offsets = store.partition_offsets("m").unwrap();
        let stored = held_bytes(&store);
        assert_eq!(offsets.iter().map(|o| o.bytes).sum::<u64>(), stored, "bytes count what is stored");
        // A retry in a later entry still finds the original offsets.
        let retry = small_produce("m", 0, "d", seq(2));
        let again = store.apply(&[Some(&retry)], Bytes::from_static(b"4")).unwrap().remove(0);
        assert_eq!(again, CommandResponse::Produced { base_offset: 2, count: 1, duplicate: true });
    }

    /// A merged batch stays under MERGED_BATCH_BYTES; a larger produce is stored alone; reads
    /// cross the boundaries.
    #[test]
    fn merged_batches_are_bounded_in_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        let create = Command::CreateTopic { name: name("m"), partitions: 1, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        let kib = "k".repeat(1000);
        let big = "B".repeat(MERGED_BATCH_BYTES + 1);
        let mut cmds: Vec<Command> = (0..150).map(|_| small_produce("m", 0, &kib, None)).collect();
        cmds.insert(70, small_produce("m", 0, &big, None));
        let entry = Command::Batch(cmds);
        store.apply(&[Some(&entry)], Bytes::from_static(b"2")).unwrap();
        let batches = stored_batches(&store);
        // A merged batch takes as many one-record batches of 1 KB as fit 64 KiB (62): the 70 small
        // ones before the big one make 62 + 8, the big one is alone, and the 80 after make 62 + 18.
        let per = (MERGED_BATCH_BYTES / batch_of(vec![rec(&kib)]).len()) as u64;
        assert_eq!(per, 62);
        let bases: Vec<u64> = batches.iter().filter_map(|(k, _)| batch::parse_key(k)).map(|(_, _, b)| b).collect();
        assert_eq!(bases, vec![0, per, 70, 71, 71 + per]);
        assert!(batches.iter().all(|(_, v)| v.len() < 128 << 10), "every stored value stays under sled's blob size");
        let all = store.read("m", 0, 0, 1000, usize::MAX).unwrap().records;
        assert_eq!(all.len(), 151);
        assert!(all.iter().enumerate().all(|(i, (o, _))| *o == i as u64));
        assert_eq!(all[70].1.value.len(), big.len());
    }

    /// Which entries one apply call gets differs from node to node (it is whatever had committed).
    /// Batch boundaries must not: retention cuts at them. Merging never crosses an entry, so the
    /// stored state is the same however the entries are grouped.
    #[test]
    fn stored_batches_do_not_depend_on_how_entries_are_grouped_into_apply_calls() {
        let entries: Vec<Command> =
            std::iter::once(Command::CreateTopic { name: name("m"), partitions: 2, config: TopicConfig::default() })
                .chain((0..6u32).map(|e| {
                    Command::Batch(
                        (0..5u32).map(|i| small_produce("m", (e + i) % 2, &format!("{e}-{i}"), None)).collect(),
                    )
                }))
                .chain(std::iter::once(small_produce("m", 0, "alone", None)))
                .collect();
        let one_call = tempfile::tempdir().unwrap();
        let a = open_store(one_call.path());
        let all: Vec<Option<&Command>> = entries.iter().map(Some).collect();
        a.apply(&all, Bytes::from_static(b"end")).unwrap();
        let call_each = tempfile::tempdir().unwrap();
        let b = open_store(call_each.path());
        for e in &entries {
            b.apply(&[Some(e)], Bytes::from_static(b"end")).unwrap();
        }
        assert_eq!(stored_batches(&a), stored_batches(&b));
        assert_eq!(stored_batches(&a).len(), 6 * 2 + 1, "one batch per partition per entry");
        assert_eq!(a.partition_offsets("m").unwrap(), b.partition_offsets("m").unwrap());
    }

    // Merged tails (apply version 3, `TAIL_MERGE_BYTES`).

    fn at_merged_tails(store: &TopicStore, topic: &str, partitions: u32) {
        set_version(store, MERGED_TAILS).unwrap();
        let create = Command::CreateTopic { name: name(topic), partitions, config: TopicConfig::default() };
        store.apply(&[Some(&create)], Bytes::from_static(b"c")).unwrap();
    }

    fn hundred_bytes(i: usize) -> String {
        format!("{i:0>100}")
    }

    fn produce_one(store: &TopicStore, topic: &str, i: usize) -> u64 {
        let v = hundred_bytes(i);
        match produce(store, topic, 0, &[v.as_str()], (i % 251) as u8) {
            CommandResponse::Produced { base_offset, .. } => base_offset,
            other => panic!("{other:?}"),
        }
    }

    /// Every record of partition 0 from `from`, read in small fetches: (offset, value).
    fn read_all(store: &TopicStore, topic: &str, from: u64) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut at = from;
        while at < store.end_offset(topic, 0).unwrap() {
            let got = store.read(topic, 0, at, 7, 1 << 20).unwrap();
            assert!(!got.records.is_empty());
            for (off, r) in got.records {
                assert_eq!(off, at);
                out.push((off, String::from_utf8(r.value.to_vec()).unwrap()));
                at += 1;
            }
        }
        out
    }

    /// One-record entries (the shape of one-record requests at a low rate) end up in few stored
    /// batches, every record still read at its offset, before and after a reopen, and the
    /// partition's byte count is what its batches hold.
    #[test]
    fn one_record_entries_merge_into_the_partitions_last_batch_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_store(dir.path());
            at_merged_tails(&store, "t", 1);
            for i in 0..300 {
                assert_eq!(produce_one(&store, "t", i), i as u64);
            }
            let expected: Vec<(u64, String)> = (0..300).map(|i| (i as u64, hundred_bytes(i))).collect();
            assert_eq!(read_all(&store, "t", 0), expected);
            assert_eq!(read_all(&store, "t", 123), expected[123..]);
            let batches = stored_batches(&store);
            // 100-byte records take 125 bytes stored: 32 to a batch under 4 KiB.
            assert!((9..=12).contains(&batches.len()), "{} batches for 300 records", batches.len());
            for (_, stored) in &batches[..batches.len() - 1] {
                assert!(stored.len() <= TAIL_MERGE_BYTES && stored.len() > TAIL_MERGE_BYTES - 300, "{}", stored.len());
            }
            let held: u64 = batches.iter().map(|(_, v)| v.len() as u64).sum();
            assert_eq!(store.partition_offsets("t").unwrap()[0].bytes, held);
            store.flush_durable().unwrap();
            assert_eq!(store.inner.files.live_bytes().unwrap(), held, "replaced versions released after the flush");
        }
        let store = open_store(dir.path());
        let expected: Vec<(u64, String)> = (0..300).map(|i| (i as u64, hundred_bytes(i))).collect();
        assert_eq!(read_all(&store, "t", 0), expected);
        assert_eq!(produce_one(&store, "t", 300), 300, "merging goes on after a reopen");
        assert_eq!(read_all(&store, "t", 299).len(), 2);
    }

    /// A tail merged into is synced before sled holds its reference when a pinned snapshot's export
    /// reads that key (sled may write the reference out on its own at any time; the export, a
    /// rebuild after a power loss too, must find its bytes). Nothing else is: a new batch, or a
    /// merge into one that began after every pinned snapshot, is past what any export reads, and
    /// if lost the log replays it.
    #[test]
    fn a_merged_tail_a_snapshot_names_is_synced_before_its_reference_reaches_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        at_merged_tails(&store, "t", 1);
        produce_one(&store, "t", 0);
        commit(&store);
        assert_eq!(store.inner.files.unsynced_files(), 1, "a new batch's commit does not sync");
        produce_one(&store, "t", 1);
        assert_eq!(store.inner.files.unsynced_files(), 1);
        commit(&store);
        assert_eq!(store.inner.files.unsynced_files(), 0, "no snapshot pinned yet: a merge syncs");
        store.capture_snapshot().unwrap();
        at_merged_tails(&store, "u", 1);
        produce_one(&store, "u", 0);
        produce_one(&store, "u", 1);
        commit(&store);
        assert_eq!(store.inner.files.unsynced_files(), 1, "a merge into a batch no snapshot names does not sync");
        produce_one(&store, "t", 2);
        commit(&store);
        assert_eq!(store.inner.files.unsynced_files(), 0, "a merge into a batch the snapshot names syncs");
    }

    /// With no snapshot flushing the store, replaced tail versions still do not pile up: apply
    /// makes the store durable and releases them past `MAX_SUPERSEDED`.
    #[test]
    fn replaced_tail_versions_are_bounded_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        at_merged_tails(&store, "t", 1);
        for i in 0..200 {
            produce_one(&store, "t", i);
            assert!(store.inner.superseded.lock().unwrap().len() <= MAX_SUPERSEDED);
        }
        let held = held_bytes(&store);
        let live = store.inner.files.live_bytes().unwrap();
        assert!(live - held <= MAX_SUPERSEDED as u64 * TAIL_MERGE_BYTES as u64, "{live} live, {held} held");
        assert_eq!(read_all(&store, "t", 0).len(), 200);
    }

    /// A snapshot stream whose batches do not cover each partition's start..end exactly is refused
    /// at install (a later merge into the last batch would not find the end it expects).
    #[test]
    fn an_install_refuses_a_stream_whose_batches_leave_a_gap_or_stop_short() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = open_store(a_dir.path());
        let b = open_store(b_dir.path());
        create(&a, "t", 0);
        produce_one(&a, "t", 0);
        produce_one(&a, "t", 1);
        let manifest = a.capture_snapshot().unwrap();
        let batches = stored_batches(&a);
        assert_eq!(batches.len(), 2, "version 1: a batch per entry");
        for (keep, why) in [(1, "must cover"), (0, "its batches end at 1")] {
            let mut fw = FrameWriter::new(Vec::new()).unwrap();
            fw.frame(FrameKind::Header, &[manifest.header_bytes()]).unwrap();
            let (k, v) = &batches[keep];
            fw.frame(FrameKind::Batch, &[k, v]).unwrap();
            fw.frame(FrameKind::End, &[&1u64.to_le_bytes()]).unwrap();
            let err = b.import_snapshot(&fw.into_inner()[..], "test").unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let (_, whole) = a.export_snapshot(&manifest, Vec::new()).unwrap();
        b.import_snapshot(&whole[..], "test").unwrap();
        assert_eq!(read_all(&b, "t", 0).len(), 2);
    }

    /// Before the log reaches version 3 every entry is its own batch, as on nodes of older builds.
    #[test]
    fn tails_are_not_merged_before_the_log_reaches_apply_version_3() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        set_version(&store, BOUNDED_PRODUCERS).unwrap();
        create(&store, "t", 0);
        for i in 0..20 {
            produce_one(&store, "t", i);
        }
        assert_eq!(stored_batches(&store).len(), 20);
        set_version(&store, MERGED_TAILS).unwrap();
        produce_one(&store, "t", 20);
        assert_eq!(stored_batches(&store).len(), 20, "from version 3 on the last one takes in the next");
    }

    /// A tail merged into in memory while sled still holds its older version: a read past the older
    /// version's end finds the newer one (of two versions of a key, the longer).
    #[test]
    fn a_read_finds_a_tail_merged_in_memory_over_its_older_version_in_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        at_merged_tails(&store, "t", 1);
        for i in 0..3 {
            produce_one(&store, "t", i);
        }
        commit(&store);
        produce_one(&store, "t", 3);
        assert!(!store.inner.uncommitted_refs.read().unwrap().refs.is_empty(), "the merge is not in sled yet");
        let got = store.read("t", 0, 3, 10, 1 << 20).unwrap();
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].0, 3);
        assert_eq!(read_all(&store, "t", 0).len(), 4);
    }

    /// Merging is a function of the log alone: however entries are grouped into apply calls (and
    /// so whether the tail is in this call, in memory, or in sled), the stored batches are the same.
    #[test]
    fn merged_tails_do_not_depend_on_how_entries_are_grouped_into_apply_calls() {
        let mut entries = vec![
            Command::SetApplyVersion { version: MERGED_TAILS },
            Command::CreateTopic { name: name("m"), partitions: 2, config: TopicConfig::default() },
        ];
        for e in 0..120u32 {
            entries.push(if e % 10 == 0 {
                Command::Batch(
                    (0..4u32).map(|i| small_produce("m", (e + i) % 2, &hundred_bytes(i as usize), None)).collect(),
                )
            } else {
                small_produce("m", e % 2, &hundred_bytes(e as usize), None)
            });
        }
        let one_call = tempfile::tempdir().unwrap();
        let a = open_store(one_call.path());
        let all: Vec<Option<&Command>> = entries.iter().map(Some).collect();
        a.apply(&all, Bytes::from_static(b"end")).unwrap();
        let call_each = tempfile::tempdir().unwrap();
        let b = open_store(call_each.path());
        for (i, e) in entries.iter().enumerate() {
            b.apply(&[Some(e)], Bytes::from_static(b"end")).unwrap();
            if i % 17 == 0 {
                commit(&b);
            }
        }
        let batches = stored_batches(&a);
        assert_eq!(batches, stored_batches(&b));
        assert!(batches.len() < 20, "{} batches for 156 records", batches.len());
        assert_eq!(a.partition_offsets("m").unwrap(), b.partition_offsets("m").unwrap());
    }

    /// A snapshot taken before more records were merged into a partition's last batch streams that
    /// batch cut back to the snapshot's end; a replica installing it and applying the same entries
    /// after it ends with the same batches as the source.
    #[test]
    fn a_snapshot_cuts_a_tail_merged_after_it_back_to_its_end() {
        for encoding in [RecordEncoding::Bincode, RecordEncoding::Varint] {
            let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = open_store(a_dir.path());
            let b = open_store(b_dir.path());
            at_merged_tails(&a, "t", 1);
            set_version(&a, VARINT_RECORDS).unwrap();
            let entries: Vec<Command> = (0..50).map(|i| produce_in("t", &hundred_bytes(i), encoding)).collect();
            for c in &entries[..40] {
                a.apply(&[Some(c)], Bytes::from_static(b"early")).unwrap();
            }
            let manifest = a.capture_snapshot().unwrap();
            for c in &entries[40..] {
                a.apply(&[Some(c)], Bytes::from_static(b"later")).unwrap();
            }
            commit(&a);
            let (_, buf) = a.export_snapshot(&manifest, Vec::new()).unwrap();
            b.import_snapshot(&buf[..], "test").unwrap();
            assert_eq!(b.end_offset("t", 0).unwrap(), 40);
            assert_eq!(read_all(&b, "t", 0), (0..40).map(|i| (i as u64, hundred_bytes(i))).collect::<Vec<_>>());
            assert_eq!(b.partition_offsets("t").unwrap()[0].bytes, held_bytes(&b));
            for c in &entries[40..] {
                b.apply(&[Some(c)], Bytes::from_static(b"later")).unwrap();
            }
            assert_eq!(stored_batches(&a), stored_batches(&b), "{encoding:?}");
            assert_eq!(a.partition_offsets("t").unwrap(), b.partition_offsets("t").unwrap());
        }
    }

    // Varint records (apply version 4).

    fn produce_in(topic: &str, v: &str, encoding: RecordEncoding) -> Command {
        let records = RecordBatch::encode(&[rec(v)], encoding).unwrap();
        Command::Produce { topic: name(topic), partition: 0, records, producer: None }
    }

    /// Each stored batch of partition 0 of `t`: its base offset, encoding and record count.
    fn batch_encodings(store: &TopicStore) -> Vec<(u64, RecordEncoding, u32)> {
        stored_batches(store)
            .iter()
            .map(|(k, v)| {
                let h = batch::summary(&|| "batch".into(), v).unwrap();
                (batch::parse_key(k).unwrap().2, h.encoding, h.count)
            })
            .collect()
    }

    /// Varint records are refused until the log reaches version 4 (a member of an older build could
    /// not read them). From then on a stored batch keeps one encoding: an entry in the other one
    /// (bincode, proposed before the leader moved) starts a new batch, within one entry or across
    /// entries, and every record still reads back in order.
    #[test]
    fn varint_records_wait_for_apply_version_4_and_a_batch_keeps_one_encoding() {
        use RecordEncoding::{Bincode, Varint};
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        at_merged_tails(&store, "t", 1);
        let early = Command::Batch(vec![
            produce_in("t", "b0", Bincode),
            produce_in("t", "early", Varint),
            produce_in("t", "b1", Bincode),
        ]);
        match store.apply(&[Some(&early)], Bytes::from_static(b"e")).unwrap().as_slice() {
            [CommandResponse::Batch(answers)] => match answers.as_slice() {
                [CommandResponse::Produced { base_offset: 0, .. }, CommandResponse::Rejected { code: ErrorCode::InvalidRequest, message }, CommandResponse::Produced { base_offset: 1, .. }] =>
                {
                    assert!(message.contains("version 4"), "{message}")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert_eq!(batch_encodings(&store), [(0, Bincode, 2)], "the refused one is not stored");
        set_version(&store, VARINT_RECORDS).unwrap();
        for (v, e) in [("v2", Varint), ("v3", Varint), ("b4", Bincode)] {
            store.apply(&[Some(&produce_in("t", v, e))], Bytes::from_static(b"p")).unwrap();
        }
        let entry = Command::Batch(vec![
            produce_in("t", "v5", Varint),
            produce_in("t", "b6", Bincode),
            produce_in("t", "b7", Bincode),
            produce_in("t", "v8", Varint),
        ]);
        store.apply(&[Some(&entry)], Bytes::from_static(b"q")).unwrap();
        assert_eq!(
            batch_encodings(&store),
            [(0, Bincode, 2), (2, Varint, 2), (4, Bincode, 1), (5, Varint, 1), (6, Bincode, 2), (8, Varint, 1)]
        );
        let values: Vec<String> = read_all(&store, "t", 0).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["b0", "b1", "v2", "v3", "b4", "v5", "b6", "b7", "v8"]);
        assert_eq!(store.partition_offsets("t").unwrap()[0].bytes, held_bytes(&store));
        // A read hands out a varint batch's values as slices of the bytes it read (they share
        // one buffer, so none is the only reference to it); a bincode batch's as copies.
        let read = store.read("t", 0, 0, 4, 1 << 20).unwrap().records;
        let unique: Vec<bool> = read.iter().map(|(_, r)| r.value.is_unique()).collect();
        assert_eq!(unique, [true, true, false, false], "b0 b1 (bincode) copied, v2 v3 (varint) shared");
        // Two records out of a batch of a hundred are copied out: a queued response must not
        // keep a whole batch alive for a few records.
        let many: Vec<Record> = (0..100).map(|i| rec(&format!("m{i:02}"))).collect();
        let cmd = Command::Produce {
            topic: name("t"),
            partition: 0,
            records: RecordBatch::encode(&many, Varint).unwrap(),
            producer: None,
        };
        store.apply(&[Some(&cmd)], Bytes::from_static(b"r")).unwrap();
        let read = store.read("t", 0, 9, 2, 1 << 20).unwrap().records;
        let got: Vec<(u64, &[u8], bool)> = read.iter().map(|(o, r)| (*o, &r.value[..], r.value.is_unique())).collect();
        assert_eq!(got, [(9, &b"m00"[..], true), (10, &b"m01"[..], true)]);
    }

    /// A retention cut at the end of the merged tail drops it, and the next record starts a batch of
    /// its own; a cut inside a merged batch is refused (not a boundary).
    #[test]
    fn retention_cuts_between_merged_batches_and_the_next_record_starts_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path());
        at_merged_tails(&store, "t", 1);
        for i in 0..5 {
            produce_one(&store, "t", i);
        }
        let t = store.topic("t").unwrap().unwrap();
        let cut = |new_start| Command::TruncatePrefix { topic: name("t"), topic_id: t.id, partition: 0, new_start };
        let inside = store.apply(&[Some(&cut(3))], Bytes::from_static(b"x")).unwrap();
        assert!(matches!(&inside[0], CommandResponse::Rejected { code: ErrorCode::InvalidRequest, .. }), "{inside:?}");
        // A produce merging into the tail and a cut in one call: the cut sees the merged version,
        // not the one sled still holds (whose end, 5, is inside the merged batch now).
        let both = [small_produce("t", 0, &hundred_bytes(5), None), cut(5)];
        let out = store.apply(&[Some(&both[0]), Some(&both[1])], Bytes::from_static(b"y")).unwrap();
        assert!(matches!(&out[1], CommandResponse::Rejected { code: ErrorCode::InvalidRequest, .. }), "{out:?}");
        let both = [small_produce("t", 0, &hundred_bytes(6), None), cut(7)];
        let out = store.apply(&[Some(&both[0]), Some(&both[1])], Bytes::from_static(b"z")).unwrap();
        assert!(matches!(out[1], CommandResponse::PrefixTruncated { start_offset: 7 }), "{out:?}");
        assert_eq!(store.partition_offsets("t").unwrap()[0].bytes, 0);
        assert_eq!(produce_one(&store, "t", 7), 7);
        assert_eq!(read_all(&store, "t", 7), vec![(7, hundred_bytes(7))]);
        while store.reclaim(100).unwrap() > 0 {}
        let batches = stored_batches(&store);
        assert_eq!(batches.len(), 1, "the dropped tail is reclaimed, the new record is a batch of its own");
    }

    /// Compaction copies a partition's last batch; apply merges into it before the swap: the swap
    /// leaves the key alone (the copy is forgotten), whether the merge is in sled yet or not.
    #[test]
    fn a_compaction_swap_leaves_a_tail_apply_merged_into_since_the_copy() {
        for committed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = open_store(dir.path());
            at_merged_tails(&store, "t", 1);
            for i in 0..3 {
                produce_one(&store, "t", i);
            }
            commit(&store);
            let cur = store.current().unwrap();
            let (key, old_value) = cur.generation.records.iter().next_back().unwrap().unwrap();
            let old = BatchRef::decode(&|| "ref".into(), &old_value).unwrap();
            let stored = store.inner.files.read(&|| "batch".into(), &old).unwrap();
            let new =
                store.inner.files.store_in(Lane::Compaction, cur.generation.id, &|| "copy".into(), &stored).unwrap();
            produce_one(&store, "t", 3);
            if committed {
                commit(&store);
            }
            let done = store.swap_references(cur.generation.id, vec![Move { key, old_value, old, new }]).unwrap();
            assert_eq!(done.map(|d| d.len()), Some(0), "committed: {committed}");
            assert_eq!(read_all(&store, "t", 0).len(), 4, "committed: {committed}");
            store.flush_durable().unwrap();
            let held = held_bytes(&store);
            assert_eq!(store.inner.files.live_bytes().unwrap(), held, "committed: {committed}");
        }
    }

    /// A small deterministic generator for the randomised test below (no dependency).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// One produce to a random partition of `t`; `ends`/`cuts` track each partition's end offsets.
    /// After the move to version 4 (`varint`), three in four entries are in the varint encoding.
    fn random_produce(rng: &mut Lcg, ends: &mut [u64; 3], cuts: &mut [Vec<u64>], varint: bool) -> Command {
        let p = rng.below(3) as usize;
        let records: Vec<Record> = (0..1 + rng.below(3))
            .map(|j| {
                let size = if rng.below(20) == 0 { 2000 + rng.below(3000) } else { rng.below(300) };
                Record {
                    key: (rng.below(2) == 0).then(|| Bytes::from(format!("k{j}"))),
                    value: Bytes::from(vec![b'x'; size as usize]),
                    headers: vec![],
                    timestamp_ms: rng.below(1000) as i64 - 500,
                }
            })
            .collect();
        ends[p] += records.len() as u64;
        cuts[p].push(ends[p]);
        let encoding = if varint && rng.below(4) != 0 { RecordEncoding::Varint } else { RecordEncoding::Bincode };
        let records = RecordBatch::encode(&records, encoding).unwrap();
        Command::Produce { topic: name("t"), partition: p as u32, records, producer: None }
    }

    /// A log of produces to 3 partitions (records of 0 to 300 bytes, now and then 2 to 5 KB, keyed
    /// or not), entries of several requests, and retention cuts (some on a boundary, some not),
    /// moving to version 4 (varint records, mixed with bincode ones after it) a third of the way.
    fn random_log(seed: u64, n: usize) -> Vec<Command> {
        let mut rng = Lcg(seed);
        let mut out = vec![
            Command::SetApplyVersion { version: MERGED_TAILS },
            Command::CreateTopic { name: name("t"), partitions: 3, config: TopicConfig::default() },
        ];
        let mut ends = [0u64; 3];
        let mut cuts: Vec<Vec<u64>> = vec![vec![]; 3];
        for i in 0..n {
            let varint = i > n / 3;
            if i == n / 3 {
                out.push(Command::SetApplyVersion { version: VARINT_RECORDS });
            }
            let r = rng.below(20);
            if r < 14 {
                out.push(random_produce(&mut rng, &mut ends, &mut cuts, varint));
            } else if r < 18 {
                let k = 1 + rng.below(4);
                out.push(Command::Batch(
                    (0..k).map(|_| random_produce(&mut rng, &mut ends, &mut cuts, varint)).collect(),
                ));
            } else {
                let p = rng.below(3) as usize;
                let at = cuts[p].get(rng.below(cuts[p].len().max(1) as u64) as usize).copied();
                out.push(match at {
                    Some(new_start) => {
                        Command::TruncatePrefix { topic: name("t"), topic_id: 0, partition: p as u32, new_start }
                    }
                    None => Command::SetApplyVersion { version: MERGED_TAILS },
                });
            }
        }
        out
    }

    /// Merged tails under everything that may differ between replicas: one store applies the log an
    /// entry per call with flushes, compaction, reclaim and snapshots between; another in random
    /// groups of entries, with compaction; a third installs the first's last snapshot and applies
    /// the rest. All three answer alike and hold the same batches from each start offset on; byte
    /// counts are what the batches hold; and once flushed, reclaimed and compacted, the files' live
    /// bytes are exactly what references name (no version released twice or never).
    #[test]
    fn merged_tails_are_the_same_whatever_the_grouping_local_events_or_snapshot_install() {
        let opts =
            TopicStoreOptions { batch_file_bytes: 16 << 10, compact_scan_refs: 50, ..TopicStoreOptions::default() };
        let at = |i: usize| Bytes::from(i.to_le_bytes().to_vec());
        for seed in 0..12u64 {
            let log = random_log(seed, 300);
            let mut rng = Lcg(seed ^ 0xdead);
            let a_dir = tempfile::tempdir().unwrap();
            let a = open_store_with(a_dir.path(), &opts);
            let mut answers_a = Vec::new();
            let mut snapshot: Option<(usize, SnapshotManifest)> = None;
            for (i, e) in log.iter().enumerate() {
                answers_a.extend(a.apply(&[Some(e)], at(i)).unwrap());
                match rng.below(30) {
                    0 => a.flush_durable().unwrap(),
                    1 => drop(a.compact(1 << 20).unwrap()),
                    2 => drop(a.reclaim(1000).unwrap()),
                    3 => {
                        let m = a.capture_snapshot().unwrap();
                        a.flush_durable().unwrap();
                        a.pin_snapshot(&m).unwrap();
                        snapshot = Some((i, m));
                    }
                    _ => {}
                }
            }
            let b_dir = tempfile::tempdir().unwrap();
            let b = open_store_with(b_dir.path(), &opts);
            let mut answers_b = Vec::new();
            let mut i = 0;
            while i < log.len() {
                let j = (i + 1 + rng.below(40) as usize).min(log.len());
                let cmds: Vec<Option<&Command>> = log[i..j].iter().map(Some).collect();
                answers_b.extend(b.apply(&cmds, at(j - 1)).unwrap());
                if rng.below(5) == 0 {
                    b.compact(1 << 20).unwrap();
                }
                i = j;
            }
            assert_eq!(answers_a, answers_b, "seed {seed}: answers");
            let offsets = a.partition_offsets("t").unwrap();
            assert_eq!(offsets, b.partition_offsets("t").unwrap(), "seed {seed}: offsets");
            let live = |store: &TopicStore| -> Vec<(Vec<u8>, Vec<u8>)> {
                stored_batches(store)
                    .into_iter()
                    .filter(|(k, _)| {
                        batch::parse_key(k).is_some_and(|(_, p, base)| base >= offsets[p as usize].start_offset)
                    })
                    .collect()
            };
            let batches = live(&a);
            assert_eq!(batches, live(&b), "seed {seed}: batches, grouped apply calls");
            for o in &offsets {
                let held: u64 = batches
                    .iter()
                    .filter(|(k, _)| batch::parse_key(k).is_some_and(|(_, p, _)| p == o.partition))
                    .map(|(_, v)| v.len() as u64)
                    .sum();
                assert_eq!(held, o.bytes, "seed {seed}: bytes of partition {}", o.partition);
            }
            if let Some((taken_at, m)) = snapshot {
                let (_, stream) = a.export_snapshot(&m, Vec::new()).unwrap();
                let c_dir = tempfile::tempdir().unwrap();
                let c = open_store_with(c_dir.path(), &opts);
                c.import_snapshot(&stream[..], "test").unwrap();
                for (n, e) in log.iter().enumerate().skip(taken_at + 1) {
                    c.apply(&[Some(e)], at(n)).unwrap();
                }
                assert_eq!(offsets, c.partition_offsets("t").unwrap(), "seed {seed}: offsets, installed");
                assert_eq!(batches, live(&c), "seed {seed}: batches, installed");
            }
            a.flush_durable().unwrap();
            while a.reclaim(1000).unwrap() > 0 {}
            a.compact(1 << 30).unwrap();
            a.flush_durable().unwrap();
            assert_eq!(a.inner.files.live_bytes().unwrap(), held_bytes(&a), "seed {seed}: live bytes");
        }
    }
}
