//! Snapshots that name the data instead of copying it.
//!
//! A Raft snapshot at index X is the store's metadata at X (topics, partition offsets, producer and
//! group state) plus every batch of each partition in `start_offset..end_offset` at X. Those batches
//! are already in the store: apply never rewrites or removes one, and what it adds later lies beyond
//! the end offsets at X. So a snapshot is kept as a [`SnapshotManifest`] — the metadata at X and the
//! generation of trees it refers to — a few kilobytes whatever the data volume. The batches are read
//! from the store only when the snapshot is streamed to a follower
//! ([`crate::TopicStore::export_snapshot`]), and physical deletion
//! ([`crate::TopicStore::reclaim`]) keeps every batch the store's pinned manifest ([`Pin`]) names.
//!
//! Before this, each snapshot was a full copy of the data in a file (two on disk at a time), and
//! building one read every batch: disk use tripled and memory stepped up at each snapshot.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::groups::GroupState;
use crate::topic_store::{PartitionState, ProducerKey, ProducerState, TopicMeta};
use crate::StoreError;

/// Everything of the state machine except the record batches: the first frame of a snapshot stream
/// and the body of a manifest.
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    pub applied: Option<Vec<u8>>,
    pub next_topic_id: u32,
    pub next_producer_id: u64,
    pub topics: Vec<TopicMeta>,
    pub partitions: Vec<(u32, u32, PartitionState)>,
    pub producers: Vec<(ProducerKey, ProducerState)>,
    pub groups: Vec<(String, GroupState)>,
    /// Each producer state's stamp (`producers` module): last, so that a header written before
    /// stamps existed is that header exactly, cut short here.
    pub producer_stamps: Vec<(ProducerKey, u64)>,
    /// `crate::apply_version`. Added with the stamps (the one build that wrote stamps without it,
    /// `dbfee81`, never landed; its headers are refused as cut short).
    pub apply_version: u32,
}

/// A header as written before producer stamps existed.
#[derive(Deserialize)]
struct UnstampedHeader {
    applied: Option<Vec<u8>>,
    next_topic_id: u32,
    next_producer_id: u64,
    topics: Vec<TopicMeta>,
    partitions: Vec<(u32, u32, PartitionState)>,
    producers: Vec<(ProducerKey, ProducerState)>,
    groups: Vec<(String, GroupState)>,
}

impl SnapshotHeader {
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        bincode::serialize(self).map_err(|e| StoreError::corrupt("snapshot header", e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |e: bincode::Error| StoreError::corrupt("snapshot header", e.to_string());
        match bincode::deserialize::<Self>(bytes) {
            Ok(h) => Ok(h),
            // Cut short: an older header if it ends exactly where the stamps would begin (its
            // layout, every byte used). Frames are crc-checked before this; a header cut anywhere
            // else is refused.
            Err(e) if matches!(&*e, bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof) => {
                use bincode::Options;
                let strict = bincode::DefaultOptions::new().with_fixint_encoding().reject_trailing_bytes();
                let h: UnstampedHeader = strict.deserialize(bytes).map_err(corrupt)?;
                Ok(Self {
                    applied: h.applied,
                    next_topic_id: h.next_topic_id,
                    next_producer_id: h.next_producer_id,
                    topics: h.topics,
                    partitions: h.partitions,
                    producers: h.producers,
                    groups: h.groups,
                    producer_stamps: Vec::new(),
                    apply_version: crate::apply_version::LEGACY_APPLY_VERSION,
                })
            }
            Err(e) => Err(corrupt(e)),
        }
    }
}

/// A snapshot of the store at one applied position, held as the metadata at that position and the
/// generation of trees whose batches it names. Only the store that made it (by capture or by
/// installing a snapshot stream) can stream it, and only while that generation is current.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    generation: u64,
    /// An encoded [`SnapshotHeader`], sent as is as the first frame of the stream.
    header: Vec<u8>,
    applied: Option<Vec<u8>>,
    batch_bytes: u64,
}

impl SnapshotManifest {
    pub(crate) fn new(generation: u64, header: &SnapshotHeader) -> Result<Self, StoreError> {
        Ok(Self {
            generation,
            header: header.encode()?,
            applied: header.applied.clone(),
            batch_bytes: header.partitions.iter().map(|(_, _, s)| s.bytes).sum(),
        })
    }

    /// The applied position the snapshot is at (the opaque bytes given to `apply`).
    pub fn applied(&self) -> Option<Bytes> {
        self.applied.as_ref().map(|a| Bytes::copy_from_slice(a))
    }

    /// Bytes of the batches it names: about what streaming it sends.
    pub fn batch_bytes(&self) -> u64 {
        self.batch_bytes
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn header_bytes(&self) -> &[u8] {
        &self.header
    }
}

/// What physical deletion must keep for the pinned manifest: each partition's batches from its start
/// offset at the snapshot's index, and every batch of the topics that existed then.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pin {
    starts: HashMap<(u32, u32), u64>,
    /// Each partition's end offset at the snapshot's index: an export reads the batches below it.
    ends: HashMap<(u32, u32), u64>,
    topics: HashSet<u32>,
}

impl Pin {
    pub fn of(manifest: &SnapshotManifest) -> Result<Self, StoreError> {
        let header = SnapshotHeader::decode(manifest.header_bytes())?;
        Ok(Self {
            starts: header.partitions.iter().map(|(t, p, s)| ((*t, *p), s.start_offset)).collect(),
            ends: header.partitions.iter().map(|(t, p, s)| ((*t, *p), s.end_offset)).collect(),
            topics: header.topics.iter().map(|t| t.id).collect(),
        })
    }

    /// Keeps what either pin keeps: while a new snapshot is being published, the one still published
    /// stays pinned too (a crash before the publish reopens it).
    pub fn merged(mut self, other: Pin) -> Pin {
        for (k, start) in other.starts {
            self.starts.entry(k).and_modify(|s| *s = (*s).min(start)).or_insert(start);
        }
        for (k, end) in other.ends {
            self.ends.entry(k).and_modify(|e| *e = (*e).max(end)).or_insert(end);
        }
        self.topics.extend(other.topics);
        self
    }

    /// Whether an export of a pinned manifest reads the batch of a partition at `base` (its key).
    pub fn exports_batch_at(&self, topic_id: u32, partition: u32, base: u64) -> bool {
        self.ends.get(&(topic_id, partition)).is_some_and(|end| base < *end)
    }

    /// Batches of a partition below this offset may be deleted; `start_now` is its start offset now.
    pub fn floor(&self, topic_id: u32, partition: u32, start_now: u64) -> u64 {
        self.starts.get(&(topic_id, partition)).map_or(start_now, |s| start_now.min(*s))
    }

    /// Whether the batches of a deleted topic must stay.
    pub fn holds_topic(&self, topic_id: u32) -> bool {
        self.topics.contains(&topic_id)
    }
}

#[cfg(test)]
mod header_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(stamps: Vec<(ProducerKey, u64)>) -> SnapshotHeader {
        let st = ProducerState { recent: [(0, 7, 1)].into(), last_used: 0 };
        SnapshotHeader {
            applied: Some(vec![1, 2]),
            next_topic_id: 3,
            next_producer_id: 9,
            topics: Vec::new(),
            partitions: Vec::new(),
            producers: vec![((4, 0, 0), st)],
            groups: Vec::new(),
            producer_stamps: stamps,
            apply_version: 2,
        }
    }

    #[test]
    fn a_header_from_before_producer_stamps_still_reads_and_a_cut_one_does_not() {
        let stamped = header(vec![((4, 0, 0), 11)]).encode().unwrap();
        let back = SnapshotHeader::decode(&stamped).unwrap();
        assert_eq!((back.producers.len(), back.producer_stamps), (1, vec![((4, 0, 0), 11)]));
        assert_eq!(back.apply_version, 2);
        // The older layout is this one without the stamps' vector (an 8-byte length, empty here)
        // and the apply version (4 bytes).
        let mut old = header(Vec::new()).encode().unwrap();
        old.truncate(old.len() - 12);
        let back = SnapshotHeader::decode(&old).unwrap();
        assert_eq!((back.next_producer_id, back.producers.len(), back.producer_stamps.len()), (9, 1, 0));
        assert_eq!(back.apply_version, 1, "a header from before versions is at version 1");
        // Cut inside the stamps: neither layout, refused.
        assert!(SnapshotHeader::decode(&stamped[..stamped.len() - 3]).is_err());
        assert!(SnapshotHeader::decode(&stamped[..stamped.len() - 16]).is_err());
    }
}
