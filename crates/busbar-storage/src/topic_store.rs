//! The state machine's data in sled, and the deterministic apply of commands to it.
//!
//! Layout. The default tree holds one key, `generation`: which set of trees is live. A generation
//! `N` is two trees:
//! - `gN.meta`: `applied` (the replication layer's opaque applied position: last log id and
//!   membership), `next_topic_id`, `t/<name>` → [`TopicMeta`], `p/<topic id><partition>` →
//!   [`PartitionState`], `reclaim/<topic id>` → deleted topics whose batches are still to delete;
//! - `gN.records`: `[topic id][partition][base offset]` → one stored batch ([`crate::batch`]).
//!
//! Every apply writes its data *and* the applied position in one sled transaction over both trees,
//! so after a crash the store is at some applied position with exactly the data up to it.
//! Installing a snapshot fills generation N+1 and then flips `generation`, which is atomic.
//!
//! Nothing is ever deleted by apply itself: deleting a topic hides it (its id is never reused) and
//! queues its batches for [`TopicStore::reclaim`], which runs only while no snapshot export is
//! reading. That is what lets an export read a consistent point-in-time view while appends go on:
//! the data is append-only and bounded by the end offsets captured at the snapshot's index.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use busbar_types::{Command, CommandResponse, ErrorCode, Record, TopicName};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::snapshot_file::{FrameKind, FrameReader, FrameWriter};
use crate::{batch, checked, durable, StoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub id: u32,
    pub name: TopicName,
    pub partitions: u32,
}

/// A partition's offsets: records live at `start_offset..end_offset`; `end_offset` is the high
/// watermark, the next offset to assign.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: TopicName,
    pub partitions: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchResult {
    pub records: Vec<(u64, Record)>,
    pub start_offset: u64,
    pub end_offset: u64,
}

#[derive(Clone, Debug)]
pub struct TopicStoreOptions {
    /// sled's page cache. Bounded so memory does not grow with data volume.
    pub cache_bytes: u64,
}

impl Default for TopicStoreOptions {
    fn default() -> Self {
        Self { cache_bytes: 64 << 20 }
    }
}

/// What apply and reads consult in memory. Replaced whole (copy on write) after each applied batch,
/// only after the sled transaction committed, so a reader never sees an end offset whose data is not
/// in sled yet.
#[derive(Clone, Debug, Default)]
struct Meta {
    topics: BTreeMap<TopicName, TopicMeta>,
    partitions: HashMap<(u32, u32), PartitionState>,
    next_topic_id: u32,
    applied: Option<Bytes>,
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
    /// Generations replaced by a snapshot install, waiting to be dropped.
    retired: Mutex<Vec<u64>>,
}

const GENERATION_KEY: &[u8] = b"generation";
const APPLIED_KEY: &[u8] = b"applied";
const NEXT_TOPIC_ID_KEY: &[u8] = b"next_topic_id";

fn tree_names(gen: u64) -> (String, String) {
    (format!("g{gen}.meta"), format!("g{gen}.records"))
}

fn topic_key(name: &TopicName) -> Vec<u8> {
    [b"t/".as_slice(), name.as_str().as_bytes()].concat()
}

fn partition_key(topic_id: u32, partition: u32) -> Vec<u8> {
    [b"p/".as_slice(), &topic_id.to_be_bytes(), &partition.to_be_bytes()].concat()
}

fn reclaim_key(topic_id: u32) -> Vec<u8> {
    [b"reclaim/".as_slice(), &topic_id.to_be_bytes()].concat()
}

fn lock_err<T>(_: T) -> StoreError {
    StoreError::corrupt("topic store lock", "a thread panicked while holding it")
}

/// Snapshot header: everything of the state machine except the record batches.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    applied: Option<Vec<u8>>,
    next_topic_id: u32,
    topics: Vec<TopicMeta>,
    partitions: Vec<(u32, u32, PartitionState)>,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// The applied position the snapshot is at (the opaque bytes given to `apply`).
    pub applied: Option<Bytes>,
    pub batches: u64,
    pub bytes: u64,
}

impl TopicStore {
    pub fn open(path: &Path, opts: &TopicStoreOptions) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(path).cache_capacity(opts.cache_bytes).open()?;
        let gen_id = match db.get(GENERATION_KEY)? {
            Some(v) => checked::open_bincode::<u64>(&|| "generation pointer".into(), &v)?,
            None => {
                db.insert(GENERATION_KEY, checked::seal_bincode("generation", &0u64)?)?;
                0
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
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                current: RwLock::new(Current { generation, meta: Arc::new(meta) }),
                apply_lock: Mutex::new(()),
                export_guard: RwLock::new(()),
                retired: Mutex::new(Vec::new()),
            }),
        })
    }

    fn current(&self) -> Result<Current, StoreError> {
        Ok(self.inner.current.read().map_err(lock_err)?.clone())
    }

    /// The applied position last written by `apply` or a snapshot install (opaque to this crate).
    pub fn applied(&self) -> Result<Option<Bytes>, StoreError> {
        Ok(self.current()?.meta.applied.clone())
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
        let mut meta = (*cur.meta).clone();
        let mut meta_batch = sled::Batch::default();
        let mut records_batch = sled::Batch::default();
        let mut responses = Vec::with_capacity(commands.len());
        for cmd in commands {
            let resp = match cmd {
                None => CommandResponse::Empty,
                Some(cmd) => apply_one(cmd, &mut meta, &mut meta_batch, &mut records_batch)?,
            };
            responses.push(resp);
        }
        meta.applied = Some(applied_after.clone());
        meta_batch.insert(APPLIED_KEY, checked::seal(&applied_after));

        let gen = &cur.generation;
        (&gen.meta_tree, &gen.records)
            .transaction(|(m, r)| {
                m.apply_batch(&meta_batch)?;
                r.apply_batch(&records_batch)?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => StoreError::corrupt("apply", "transaction aborted"),
            })?;
        self.inner.current.write().map_err(lock_err)?.meta = Arc::new(meta);
        Ok(responses)
    }

    pub fn list_topics(&self) -> Result<Vec<TopicInfo>, StoreError> {
        let cur = self.current()?;
        Ok(cur.meta.topics.values().map(|t| TopicInfo { name: t.name.clone(), partitions: t.partitions }).collect())
    }

    pub fn topic(&self, name: &str) -> Result<Option<TopicInfo>, StoreError> {
        let cur = self.current()?;
        Ok(cur
            .meta
            .topics
            .values()
            .find(|t| t.name.as_str() == name)
            .map(|t| TopicInfo { name: t.name.clone(), partitions: t.partitions }))
    }

    pub fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, StoreError> {
        let cur = self.current()?;
        let t = find_topic(&cur.meta, topic, 0)?;
        Ok((0..t.partitions)
            .map(|p| {
                let s = cur.meta.partitions.get(&(t.id, p)).copied().unwrap_or_default();
                PartitionOffsets { partition: p, start_offset: s.start_offset, end_offset: s.end_offset }
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
        let records = &cur.generation.records;
        // The batch holding `offset` is the last one whose base offset is <= offset.
        let first_base =
            match records.range(batch::key(t.id, partition, 0)..=batch::key(t.id, partition, offset)).next_back() {
                Some(kv) => {
                    let (k, _) = kv?;
                    batch::parse_key(&k).map(|(_, _, base)| base).unwrap_or(0)
                }
                None => return Err(missing_batch(topic, partition, offset)),
            };
        // Bounded by the end offset this reader saw: batches beyond it may be mid-apply.
        let mut next_expected = None;
        let mut bytes = 0usize;
        for kv in records.range(batch::key(t.id, partition, first_base)..batch::key(t.id, partition, state.end_offset))
        {
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
            let batch_records = batch::decode(&|| format!("batch {topic}/{partition}@{base}"), &v)?;
            next_expected = Some(base + batch_records.len() as u64);
            for (i, record) in batch_records.into_iter().enumerate() {
                let off = base + i as u64;
                if off < offset {
                    continue;
                }
                bytes += record.encoded_len_hint();
                result.records.push((off, record));
                if result.records.len() >= max_records || bytes >= max_bytes {
                    return Ok(result);
                }
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
        self.inner.db.flush()?;
        durable::fsync_tree(&self.inner.path)
    }

    /// Streams a point-in-time snapshot of the store into `w`: the metadata as of the last applied
    /// entry at the moment of the call, and every batch below each partition's end offset then.
    /// Applies may continue meanwhile; they only add batches beyond those end offsets.
    pub fn export_snapshot<W: Write>(&self, w: W) -> Result<(ExportSummary, W), StoreError> {
        let _reading = self.inner.export_guard.read().map_err(lock_err)?;
        let cur = self.current()?;
        let meta = &cur.meta;
        let header = SnapshotHeader {
            applied: meta.applied.as_ref().map(|b| b.to_vec()),
            next_topic_id: meta.next_topic_id,
            topics: meta.topics.values().cloned().collect(),
            partitions: meta.partitions.iter().map(|(&(t, p), s)| (t, p, *s)).collect(),
        };
        let header = bincode::serialize(&header).map_err(|e| StoreError::corrupt("snapshot header", e.to_string()))?;
        let io_err = |e| StoreError::io("write snapshot", e);
        let mut fw = FrameWriter::new(w).map_err(io_err)?;
        fw.frame(FrameKind::Header, &[&header]).map_err(io_err)?;
        let mut batches = 0u64;
        let mut parts: Vec<_> = meta.partitions.iter().collect();
        parts.sort_by_key(|(k, _)| **k);
        for (&(topic_id, partition), state) in parts {
            let range = batch::key(topic_id, partition, 0)..batch::key(topic_id, partition, state.end_offset);
            for kv in cur.generation.records.range(range) {
                let (k, v) = kv?;
                // Verify before shipping: a corrupt batch must stop the snapshot, not spread.
                batch::decode(&|| format!("batch {topic_id}/{partition} key {k:?}"), &v)?;
                fw.frame(FrameKind::Batch, &[&k, &v]).map_err(io_err)?;
                batches += 1;
            }
        }
        fw.frame(FrameKind::End, &[&batches.to_le_bytes()]).map_err(io_err)?;
        let bytes = fw.bytes;
        Ok((ExportSummary { applied: meta.applied.clone(), batches, bytes }, fw.into_inner()))
    }

    /// Replaces the whole store with the snapshot read from `r`, atomically: the snapshot is written
    /// into a fresh generation of trees, made durable, and only then made current. A snapshot that
    /// fails its checks leaves the store as it was. Returns the snapshot's applied position.
    pub fn import_snapshot<R: Read>(&self, r: R, what: &str) -> Result<Option<Bytes>, StoreError> {
        let _apply = self.inner.apply_lock.lock().map_err(lock_err)?;
        let old = self.current()?;
        let new_id = old.generation.id + 1;
        let (m, rec) = tree_names(new_id);
        self.inner.db.drop_tree(m.as_bytes())?;
        self.inner.db.drop_tree(rec.as_bytes())?;
        let gen = open_generation(&self.inner.db, new_id)?;
        let filled = fill_generation(&gen, r, what);
        let meta = match filled.and_then(|()| load_meta(&gen.meta_tree)) {
            Ok(meta) => meta,
            Err(e) => {
                let _ = self.inner.db.drop_tree(m.as_bytes());
                let _ = self.inner.db.drop_tree(rec.as_bytes());
                return Err(e);
            }
        };
        self.flush_durable()?;
        self.inner.db.insert(GENERATION_KEY, checked::seal_bincode("generation", &new_id)?)?;
        self.flush_durable()?;
        let applied = meta.applied.clone();
        *self.inner.current.write().map_err(lock_err)? = Current { generation: gen, meta: Arc::new(meta) };
        self.inner.retired.lock().map_err(lock_err)?.push(old.generation.id);
        Ok(applied)
    }

    /// Physically deletes data nothing can reach any more: batches of deleted topics (at most
    /// `max_keys` per call, so one call is bounded) and generations replaced by a snapshot install.
    /// Skips its turn while a snapshot export is reading. Returns how many keys it deleted.
    pub fn reclaim(&self, max_keys: usize) -> Result<usize, StoreError> {
        let Ok(_exclusive) = self.inner.export_guard.try_write() else {
            return Ok(0);
        };
        let retired: Vec<u64> = std::mem::take(&mut *self.inner.retired.lock().map_err(lock_err)?);
        for gen in retired {
            let (m, r) = tree_names(gen);
            self.inner.db.drop_tree(m.as_bytes())?;
            self.inner.db.drop_tree(r.as_bytes())?;
        }
        let cur = self.current()?;
        let mut deleted = 0;
        for kv in cur.generation.meta_tree.scan_prefix(b"reclaim/") {
            let (k, _) = kv?;
            let Some(id_bytes) = k.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()) else { continue };
            let topic_id = u32::from_be_bytes(id_bytes);
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in cur.generation.records.scan_prefix(topic_id.to_be_bytes()) {
                let (rk, _) = kv?;
                batch.remove(rk);
                n += 1;
                if deleted + n >= max_keys {
                    break;
                }
            }
            cur.generation.records.apply_batch(batch)?;
            deleted += n;
            if deleted >= max_keys {
                return Ok(deleted);
            }
            cur.generation.meta_tree.remove(&k)?;
        }
        Ok(deleted)
    }

    /// Number of topics whose data is still waiting for [`TopicStore::reclaim`].
    pub fn pending_reclaim(&self) -> Result<usize, StoreError> {
        Ok(self.current()?.generation.meta_tree.scan_prefix(b"reclaim/").count())
    }

    /// Bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }
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

fn rejected(code: ErrorCode, message: String) -> CommandResponse {
    CommandResponse::Rejected { code, message }
}

fn apply_one(
    cmd: &Command,
    meta: &mut Meta,
    meta_batch: &mut sled::Batch,
    records_batch: &mut sled::Batch,
) -> Result<CommandResponse, StoreError> {
    Ok(match cmd {
        Command::CreateTopic { name, partitions } => {
            if meta.topics.contains_key(name) {
                return Ok(rejected(ErrorCode::TopicAlreadyExists, format!("topic {name} already exists")));
            }
            if *partitions == 0 {
                return Ok(rejected(ErrorCode::InvalidPartitions, "a topic needs at least one partition".into()));
            }
            let id = meta.next_topic_id;
            meta.next_topic_id =
                id.checked_add(1).ok_or_else(|| StoreError::corrupt("next topic id", "topic ids exhausted"))?;
            let t = TopicMeta { id, name: name.clone(), partitions: *partitions };
            meta_batch.insert(topic_key(name), checked::seal_bincode("topic", &t)?);
            meta_batch.insert(NEXT_TOPIC_ID_KEY, checked::seal_bincode("next topic id", &meta.next_topic_id)?);
            for p in 0..*partitions {
                let s = PartitionState::default();
                meta.partitions.insert((id, p), s);
                meta_batch.insert(partition_key(id, p), checked::seal_bincode("partition state", &s)?);
            }
            meta.topics.insert(name.clone(), t);
            CommandResponse::TopicCreated { topic_id: id }
        }
        Command::DeleteTopic { name } => {
            let Some(t) = meta.topics.remove(name) else {
                return Ok(rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {name}")));
            };
            meta_batch.remove(topic_key(name));
            for p in 0..t.partitions {
                meta.partitions.remove(&(t.id, p));
                meta_batch.remove(partition_key(t.id, p));
            }
            meta_batch.insert(reclaim_key(t.id), checked::seal_bincode("reclaim", &t.partitions)?);
            CommandResponse::TopicDeleted
        }
        Command::Produce { topic, partition, records } => {
            let Some(t) = meta.topics.get(topic) else {
                return Ok(rejected(ErrorCode::UnknownTopicOrPartition, format!("unknown topic {topic}")));
            };
            if *partition >= t.partitions {
                return Ok(rejected(
                    ErrorCode::UnknownTopicOrPartition,
                    format!("topic {topic} has partitions 0..{}; {partition} does not exist", t.partitions),
                ));
            }
            if records.is_empty() {
                return Ok(rejected(ErrorCode::InvalidRequest, "a produce batch needs at least one record".into()));
            }
            let count = u32::try_from(records.len())
                .map_err(|_| StoreError::corrupt("produce", "more than u32::MAX records in one batch"))?;
            let id = t.id;
            let state = meta.partitions.entry((id, *partition)).or_default();
            let base = state.end_offset;
            records_batch.insert(&batch::key(id, *partition, base), batch::encode(records)?);
            state.end_offset = base + u64::from(count);
            meta_batch.insert(partition_key(id, *partition), checked::seal_bincode("partition state", state)?);
            CommandResponse::Produced { base_offset: base, count }
        }
    })
}

/// Writes a snapshot stream into an empty generation, checking every frame.
fn fill_generation<R: Read>(gen: &Generation, r: R, what: &str) -> Result<(), StoreError> {
    const FLUSH_EVERY: usize = 1024;
    let mut reader = FrameReader::new(r, what)?;
    let header: SnapshotHeader = match reader.next_frame()? {
        Some((FrameKind::Header, body)) => {
            bincode::deserialize(&body).map_err(|e| reader.bad(format!("header: {e}")))?
        }
        _ => return Err(reader.bad("the first frame is not a header".into())),
    };
    let mut mb = sled::Batch::default();
    if let Some(applied) = &header.applied {
        mb.insert(APPLIED_KEY, checked::seal(applied));
    }
    mb.insert(NEXT_TOPIC_ID_KEY, checked::seal_bincode("next topic id", &header.next_topic_id)?);
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
    loop {
        match reader.next_frame()? {
            Some((FrameKind::Batch, body)) => {
                if body.len() < 16 {
                    return Err(reader.bad("batch frame shorter than its key".into()));
                }
                let (k, v) = body.split_at(16);
                batch::decode(&|| format!("snapshot batch {k:?}"), v)?;
                batch.insert(k, v);
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
                gen.records.apply_batch(batch)?;
                return Ok(());
            }
            Some((FrameKind::Header, _)) => return Err(reader.bad("second header frame".into())),
            None => return Err(reader.bad("stream ended before its end frame".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: &str) -> Record {
        Record { key: None, value: Bytes::from(v.to_string()), headers: vec![], timestamp_ms: 1 }
    }

    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn produce(store: &TopicStore, topic: &str, p: u32, vals: &[&str], pos: u8) -> CommandResponse {
        let cmd = Command::Produce { topic: name(topic), partition: p, records: vals.iter().map(|v| rec(v)).collect() };
        store.apply(&[Some(&cmd)], Bytes::from(vec![pos])).unwrap().remove(0)
    }

    #[test]
    fn apply_assigns_consecutive_offsets_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
        let create = Command::CreateTopic { name: name("orders"), partitions: 2 };
        assert_eq!(
            store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap(),
            vec![CommandResponse::TopicCreated { topic_id: 0 }]
        );
        assert_eq!(
            produce(&store, "orders", 0, &["a", "b"], 2),
            CommandResponse::Produced { base_offset: 0, count: 2 }
        );
        assert_eq!(produce(&store, "orders", 0, &["c"], 3), CommandResponse::Produced { base_offset: 2, count: 1 });
        assert_eq!(produce(&store, "orders", 1, &["x"], 4), CommandResponse::Produced { base_offset: 0, count: 1 });
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
            let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
            let create = Command::CreateTopic { name: name("t"), partitions: 1 };
            store.apply(&[Some(&create), None], Bytes::from_static(b"x")).unwrap();
            produce(&store, "t", 0, &["a", "b", "c"], 9);
            store.flush_durable().unwrap();
        }
        let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
        assert_eq!(store.applied().unwrap(), Some(Bytes::from(vec![9])));
        assert_eq!(store.read("t", 0, 0, 10, 1 << 20).unwrap().records.len(), 3);
        assert_eq!(produce(&store, "t", 0, &["d"], 10), CommandResponse::Produced { base_offset: 3, count: 1 });
    }

    #[test]
    fn snapshot_round_trip_replaces_state_and_ignores_later_appends() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let a = TopicStore::open(a_dir.path(), &TopicStoreOptions::default()).unwrap();
        let b = TopicStore::open(b_dir.path(), &TopicStoreOptions::default()).unwrap();
        let create = Command::CreateTopic { name: name("t"), partitions: 3 };
        a.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        for i in 0..50u8 {
            produce(&a, "t", u32::from(i % 3), &["r1", "r2"], i);
        }
        // b has unrelated state that the install must replace entirely.
        let other = Command::CreateTopic { name: name("other"), partitions: 1 };
        b.apply(&[Some(&other)], Bytes::from_static(b"z")).unwrap();

        let (summary, buf) = a.export_snapshot(Vec::new()).unwrap();
        assert_eq!(summary.batches, 50);
        produce(&a, "t", 0, &["after"], 99); // not in the snapshot
        let applied = b.import_snapshot(&buf[..], "test").unwrap();
        assert_eq!(applied, Some(Bytes::from(vec![49])));
        assert!(b.topic("other").unwrap().is_none());
        let offs = b.partition_offsets("t").unwrap();
        assert_eq!(offs.iter().map(|p| p.end_offset).collect::<Vec<_>>(), vec![34, 34, 32]);
        assert_eq!(b.read("t", 1, 0, 1000, 1 << 20).unwrap().records.len(), 34);
        b.reclaim(1000).unwrap();
        // The install survives a reopen.
        drop(b);
        let b = TopicStore::open(b_dir.path(), &TopicStoreOptions::default()).unwrap();
        assert_eq!(b.partition_offsets("t").unwrap()[0].end_offset, 34);
    }

    #[test]
    fn corrupt_snapshot_is_rejected_and_leaves_state() {
        let a_dir = tempfile::tempdir().unwrap();
        let a = TopicStore::open(a_dir.path(), &TopicStoreOptions::default()).unwrap();
        let create = Command::CreateTopic { name: name("t"), partitions: 1 };
        a.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&a, "t", 0, &["hello"], 2);
        let (_, mut buf) = a.export_snapshot(Vec::new()).unwrap();
        let n = buf.len();
        buf[n - 20] ^= 0x40;
        let b_dir = tempfile::tempdir().unwrap();
        let b = TopicStore::open(b_dir.path(), &TopicStoreOptions::default()).unwrap();
        assert!(b.import_snapshot(&buf[..], "bad").is_err());
        assert!(b.list_topics().unwrap().is_empty());
        // Cut short: also rejected.
        let (_, buf) = a.export_snapshot(Vec::new()).unwrap();
        assert!(b.import_snapshot(&buf[..buf.len() - 5], "short").is_err());
    }

    #[test]
    fn delete_hides_at_once_and_reclaim_frees_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
        let create = Command::CreateTopic { name: name("t"), partitions: 1 };
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
        let store = TopicStore::open(dir.path(), &TopicStoreOptions::default()).unwrap();
        let create = Command::CreateTopic { name: name("t"), partitions: 1 };
        store.apply(&[Some(&create)], Bytes::from_static(b"1")).unwrap();
        produce(&store, "t", 0, &["hello"], 2);
        let records = store.current().unwrap().generation.records;
        let (k, v) = records.iter().next().unwrap().unwrap();
        let mut bad = v.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        records.insert(k, bad).unwrap();
        assert!(matches!(store.read("t", 0, 0, 10, 100), Err(StoreError::Corrupt { .. })));
    }
}
