//! A batch of records in its stored encoding, carried as one buffer from the produce request to
//! the state machine.
//!
//! The leader encodes a produced batch once. From then on the batch is bytes: the Raft log, the
//! replication messages to the followers, the followers' logs and the stored value in the state
//! machine all copy the buffer, none of them decodes and re-encodes each record (which cost one
//! allocation per record value per hop, most of the leader's CPU under batched load). Records are
//! decoded only when read.
//!
//! Layout (little endian; the records in bincode 1's default encoding of [`Record`]):
//!
//! ```text
//! [max_timestamp_ms: i64][count: u64][record 0][record 1]...[record count-1]
//! ```
//!
//! which is bincode's own encoding of `(i64, Vec<Record>)`, so a stored batch decodes with one
//! bincode call. Because the records are simply concatenated, the batches of several produce
//! commands merge into one by writing a new header before their record bytes ([`merge`]).

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::record::Record;

/// Bytes before the first record: the newest timestamp and the record count.
pub const HEADER_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordBatchError {
    #[error("a record batch of {0} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Short(usize),
    #[error("a record batch claims {0} records; at most u32::MAX fit one batch")]
    TooManyRecords(u64),
    #[error("record batch: {0}")]
    Codec(String),
}

/// An encoded batch of records (see the [module documentation](self)). Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordBatch {
    bytes: Bytes,
}

impl RecordBatch {
    /// Encodes `records`; the batch's newest timestamp is the largest of theirs (0 when empty).
    pub fn encode(records: &[Record]) -> Result<Self, RecordBatchError> {
        let body: usize = records.iter().map(Record::encoded_len_hint).sum();
        let mut buf = Vec::with_capacity(HEADER_BYTES + body);
        let max_ts = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
        buf.extend_from_slice(&max_ts.to_le_bytes());
        buf.extend_from_slice(&(records.len() as u64).to_le_bytes());
        for r in records {
            bincode::serialize_into(&mut buf, r).map_err(|e| RecordBatchError::Codec(e.to_string()))?;
        }
        Self::from_bytes(Bytes::from(buf))
    }

    /// Takes an encoded batch, checking its header (not its records: those are checked when the
    /// batch is decoded).
    pub fn from_bytes(bytes: Bytes) -> Result<Self, RecordBatchError> {
        let Some(count) = bytes.get(8..HEADER_BYTES) else { return Err(RecordBatchError::Short(bytes.len())) };
        let count = u64::from_le_bytes(count.try_into().map_err(|_| RecordBatchError::Short(bytes.len()))?);
        if count > u64::from(u32::MAX) {
            return Err(RecordBatchError::TooManyRecords(count));
        }
        Ok(Self { bytes })
    }

    pub fn count(&self) -> u32 {
        // The header was checked in `from_bytes`, the only constructor.
        self.bytes.get(8..HEADER_BYTES).and_then(|b| b.try_into().ok()).map_or(0, |b| u64::from_le_bytes(b) as u32)
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The newest record timestamp (retention by time drops whole batches by it).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.bytes.get(..8).and_then(|b| b.try_into().ok()).map_or(0, i64::from_le_bytes)
    }

    /// The whole encoding, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Encoded size, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The records' bytes, after the header.
    fn records_bytes(&self) -> &[u8] {
        self.bytes.get(HEADER_BYTES..).unwrap_or_default()
    }

    pub fn decode(&self) -> Result<Vec<Record>, RecordBatchError> {
        decode(&self.bytes)
    }
}

/// Decodes an encoded batch (a [`RecordBatch`]'s bytes, or [`merge`]'s output).
pub fn decode(bytes: &[u8]) -> Result<Vec<Record>, RecordBatchError> {
    let (_, records): (i64, Vec<Record>) =
        bincode::deserialize(bytes).map_err(|e| RecordBatchError::Codec(e.to_string()))?;
    Ok(records)
}

/// One batch holding the records of `parts`, in order: a new header, then each part's record
/// bytes. What a [`RecordBatch::encode`] of all their records would give.
pub fn merge(parts: &[&RecordBatch]) -> Vec<u8> {
    let count: u64 = parts.iter().map(|p| u64::from(p.count())).sum();
    let max_ts = parts.iter().map(|p| p.max_timestamp_ms()).max().unwrap_or(0);
    let mut buf = Vec::with_capacity(HEADER_BYTES + parts.iter().map(|p| p.records_bytes().len()).sum::<usize>());
    buf.extend_from_slice(&max_ts.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p.records_bytes());
    }
    buf
}

impl std::fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordBatch({} records, {} bytes)", self.count(), self.bytes.len())
    }
}

/// On the wire and in the log: the encoding as one byte string (one copy, no per-record work).
impl Serialize for RecordBatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.bytes.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RecordBatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = Bytes::deserialize(d)?;
        Self::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Header;

    fn rec(i: i64) -> Record {
        Record {
            key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
            value: Bytes::from(vec![i as u8; i as usize * 3]),
            headers: if i % 3 == 0 {
                vec![Header { name: "h".into(), value: Bytes::from_static(b"v") }]
            } else {
                vec![]
            },
            timestamp_ms: 1_000 + (i * 7) % 5,
        }
    }

    #[test]
    fn round_trips_and_reports_its_header() {
        let records: Vec<Record> = (0..10).map(rec).collect();
        let b = RecordBatch::encode(&records).unwrap();
        assert_eq!(b.count(), 10);
        assert_eq!(b.max_timestamp_ms(), records.iter().map(|r| r.timestamp_ms).max().unwrap());
        assert_eq!(b.decode().unwrap(), records);
        // Through serde (the log and the replication messages), unchanged.
        let wire = bincode::serialize(&b).unwrap();
        let back: RecordBatch = bincode::deserialize(&wire).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn merged_batches_equal_one_batch_of_all_their_records() {
        let records: Vec<Record> = (0..12).map(rec).collect();
        let parts: Vec<RecordBatch> = records.chunks(5).map(|c| RecordBatch::encode(c).unwrap()).collect();
        let merged = merge(&parts.iter().collect::<Vec<_>>());
        assert_eq!(merged, RecordBatch::encode(&records).unwrap().as_bytes());
        assert_eq!(decode(&merged).unwrap(), records);
    }

    #[test]
    fn a_bad_header_is_refused() {
        assert_eq!(RecordBatch::from_bytes(Bytes::from_static(b"short")), Err(RecordBatchError::Short(5)));
        let mut too_many = vec![0u8; 16];
        too_many[8..].copy_from_slice(&(u64::from(u32::MAX) + 1).to_le_bytes());
        assert!(matches!(RecordBatch::from_bytes(Bytes::from(too_many)), Err(RecordBatchError::TooManyRecords(_))));
        // A header whose records do not follow decodes to an error, not a panic.
        let mut lying = vec![0u8; 16];
        lying[8..].copy_from_slice(&3u64.to_le_bytes());
        let b = RecordBatch::from_bytes(Bytes::from(lying)).unwrap();
        assert!(b.decode().is_err());
        let wire = bincode::serialize(&Bytes::from_static(b"tiny")).unwrap();
        assert!(bincode::deserialize::<RecordBatch>(&wire).is_err());
    }
}
