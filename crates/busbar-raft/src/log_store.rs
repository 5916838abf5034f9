//! openraft's log storage over Busbar's WAL.
//!
//! Durability contract (openraft 0.9, storage-v2): the append callback fires only after the WAL's
//! fdatasync covers the entries; the vote is durable before `save_vote` returns; the purge point is
//! persisted before entries are dropped; all writes take effect in submission order (the WAL does
//! truncate/purge/vote only after completing earlier appends).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use busbar_storage::wal::Wal;
use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::codec;
use crate::entry_cache::EntryCache;
use crate::types::{Entry, LogId, StorageError, StorageIOError, TypeConfig, Vote};

/// Encoded bytes of the newest entries kept decoded for replication (see [`EntryCache`]).
pub const ENTRY_CACHE_BYTES: usize = 32 << 20;

/// Cheap to clone: the clone handed to replication tasks as the log reader shares the WAL and the
/// entry cache.
#[derive(Clone)]
pub struct LogStore {
    wal: Wal,
    cache: Arc<Mutex<EntryCache>>,
}

impl LogStore {
    pub fn new(wal: Wal) -> Self {
        Self { wal, cache: Arc::new(Mutex::new(EntryCache::new(ENTRY_CACHE_BYTES))) }
    }

    /// The cache holds no invariant a panic elsewhere could break halfway that matters: at worst it
    /// misses entries, which are then read from the WAL.
    fn cache(&self) -> MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let Some(last) = self.wal.last_index() else { return Ok(None) };
        let bytes = self.wal.read(last).map_err(|e| StorageIOError::read_log_at_index(last, &e))?;
        let Some(bytes) = bytes else { return Ok(None) };
        let entry: Entry =
            codec::decode("log entry", &bytes).map_err(|e| StorageIOError::read_log_at_index(last, &e))?;
        Ok(Some(entry.log_id))
    }

    fn purged_log_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.wal.purged() {
            None => Ok(None),
            Some((_, meta)) => {
                Ok(Some(codec::decode("purge point", &meta).map_err(|e| StorageIOError::read_logs(&e))?))
            }
        }
    }
}

/// Bytes of entries one replication message carries at most (always at least one entry): openraft
/// gives a message one heartbeat interval, and a count limit alone lets 64 batches of 1 MiB make a
/// 64 MiB message that keeps timing out on a slow link or disk.
pub const MAX_REPLICATION_BYTES: usize = 4 << 20;

impl RaftLogReader<TypeConfig> for LogStore {
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut at = start;
        while at < end && (out.is_empty() || bytes < MAX_REPLICATION_BYTES) {
            // The newest entries come from the cache; what it no longer holds from the WAL.
            let cached_to = self.cache().read_into(at, end, MAX_REPLICATION_BYTES, &mut out, &mut bytes);
            if cached_to > at {
                at = cached_to;
                continue;
            }
            // Small steps, so the cap is overshot by at most one step's entries.
            let step_end = end.min(at.saturating_add(8));
            let raw = self.wal.read_range(at, step_end).map_err(|e| StorageIOError::read_logs(&e))?;
            if raw.is_empty() {
                break;
            }
            for (i, b) in &raw {
                if !out.is_empty() && bytes >= MAX_REPLICATION_BYTES {
                    return Ok(out);
                }
                bytes += b.len();
                out.push(
                    codec::decode::<Entry>("log entry", b).map_err(|e| StorageIOError::read_log_at_index(*i, &e))?,
                );
            }
            at = step_end;
        }
        Ok(out)
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self.wal.read_range(start, end).map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter()
            .map(|(i, b)| {
                codec::decode::<Entry>("log entry", b).map_err(|e| StorageIOError::read_log_at_index(*i, &e).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.purged_log_id()?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = codec::encode("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.wal.save_vote(Bytes::from(bytes)).map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        match self.wal.vote() {
            None => Ok(None),
            Some(b) => Ok(Some(codec::decode("vote", &b).map_err(|e| StorageIOError::read_vote(&e))?)),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // An entry at or below the purge point is already covered by the state machine (openraft
        // purges up to the applied index when the state machine is ahead of the log on startup), so
        // it is dropped rather than written: the WAL itself only accepts contiguous appends.
        let purged = self.wal.purged().map(|(i, _)| i);
        let mut encoded = Vec::new();
        let mut decoded = Vec::new();
        for entry in entries {
            if purged.is_some_and(|p| entry.log_id.index <= p) {
                continue;
            }
            let b =
                codec::encode("log entry", &entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            let size = b.len();
            encoded.push((entry.log_id.index, Bytes::from(b)));
            decoded.push((entry, size));
        }
        if encoded.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        // The callback runs on the WAL's syncer thread after the fdatasync covering these entries.
        self.wal
            .append(encoded, Box::new(move |res| callback.log_io_completed(res)))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut cache = self.cache();
        for (entry, size) in decoded {
            cache.push(entry, size);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Before the WAL: no reader may get a removed entry from the cache afterwards.
        self.cache().truncate(log_id.index);
        self.wal.truncate(log_id.index).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let meta = codec::encode("purge point", &log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.wal.purge(log_id.index, Bytes::from(meta)).map_err(|e| StorageIOError::write_logs(&e))?;
        self.cache().purge(log_id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use busbar_storage::wal::WalOptions;
    use busbar_types::{Command, Record, TopicName};
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn big_entry(index: u64, bytes: usize) -> Entry {
        let record = Record { key: None, value: Bytes::from(vec![7u8; bytes]), headers: vec![], timestamp_ms: 1 };
        let cmd = Command::Produce {
            topic: TopicName::new("t").unwrap(),
            partition: 0,
            records: busbar_types::RecordBatch::encode(&[record], busbar_types::RecordEncoding::Varint).unwrap(),
            producer: None,
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) }
    }

    #[tokio::test]
    async fn replication_reads_are_capped_in_bytes_but_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let mut store = LogStore::new(wal.clone());
        let entries: Vec<(u64, Bytes)> =
            (1..=20).map(|i| (i, Bytes::from(codec::encode("e", &big_entry(i, 1 << 20)).unwrap()))).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        wal.append(entries, Box::new(move |r| tx.send(r.is_ok()).unwrap())).unwrap();
        assert!(rx.recv().unwrap());
        let got = store.limited_get_log_entries(1, 21).await.unwrap();
        // 1 MiB entries against a 4 MiB cap: four or five, in order from the start.
        assert!((4..=5).contains(&got.len()), "{} entries", got.len());
        assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (1..=got.len() as u64).collect::<Vec<_>>());
        // One entry above the cap still comes back alone.
        let huge = Bytes::from(codec::encode("e", &big_entry(21, MAX_REPLICATION_BYTES + 10)).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        wal.append(vec![(21, huge)], Box::new(move |r| tx.send(r.is_ok()).unwrap())).unwrap();
        assert!(rx.recv().unwrap());
        assert_eq!(store.limited_get_log_entries(21, 22).await.unwrap().len(), 1);
        // A small range is returned whole.
        assert_eq!(store.limited_get_log_entries(3, 5).await.unwrap().len(), 2);
    }
}
