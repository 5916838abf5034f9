//! How a batch of records is stored: one sled value per produced batch, sealed with a crc32 that
//! is checked on every read.

use busbar_types::Record;
use serde::{Deserialize, Serialize};

use crate::checked;
use crate::StoreError;

#[derive(Serialize, Deserialize)]
struct StoredBatch {
    /// Largest record timestamp in the batch: retention by time drops whole batches by it.
    max_timestamp_ms: i64,
    records: Vec<Record>,
}

pub fn encode(records: &[Record]) -> Result<Vec<u8>, StoreError> {
    #[derive(Serialize)]
    struct StoredBatchRef<'a> {
        max_timestamp_ms: i64,
        records: &'a [Record],
    }
    let max_timestamp_ms = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    checked::seal_bincode("record batch", &StoredBatchRef { max_timestamp_ms, records })
}

/// As [`encode`], from records gathered from several produce commands; the same bytes as
/// `encode` of the same records.
pub fn encode_refs(records: &[&Record]) -> Result<Vec<u8>, StoreError> {
    #[derive(Serialize)]
    struct StoredBatchRefs<'a> {
        max_timestamp_ms: i64,
        records: &'a [&'a Record],
    }
    let max_timestamp_ms = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    checked::seal_bincode("record batch", &StoredBatchRefs { max_timestamp_ms, records })
}

/// The batch's newest timestamp and record count, checking its crc but without decoding every record.
pub fn summary(what: &dyn Fn() -> String, value: &[u8]) -> Result<(i64, u32), StoreError> {
    let payload = checked::open(what, value)?;
    // bincode lays the struct out in field order: max_timestamp_ms (i64 LE), then the records'
    // length (u64 LE).
    let (Some(ts), Some(n)) = (payload.get(..8), payload.get(8..16)) else {
        return Err(StoreError::corrupt(what(), "batch shorter than its header"));
    };
    let ts = i64::from_le_bytes(ts.try_into().unwrap_or_default());
    let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
    Ok((ts, u32::try_from(n).map_err(|_| StoreError::corrupt(what(), "record count above u32"))?))
}

pub fn decode(what: &dyn Fn() -> String, value: &[u8]) -> Result<Vec<Record>, StoreError> {
    let batch: StoredBatch = checked::open_bincode(what, value)?;
    Ok(batch.records)
}

/// Records tree key: `[topic id u32 BE][partition u32 BE][base offset u64 BE]`, so a partition's
/// batches are contiguous and ordered by offset.
pub fn key(topic_id: u32, partition: u32, base_offset: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&topic_id.to_be_bytes());
    k[4..8].copy_from_slice(&partition.to_be_bytes());
    k[8..].copy_from_slice(&base_offset.to_be_bytes());
    k
}

pub fn parse_key(k: &[u8]) -> Option<(u32, u32, u64)> {
    let k: &[u8; 16] = k.try_into().ok()?;
    let (t, rest) = k.split_at(4);
    let (p, o) = rest.split_at(4);
    Some((
        u32::from_be_bytes(t.try_into().ok()?),
        u32::from_be_bytes(p.try_into().ok()?),
        u64::from_be_bytes(o.try_into().ok()?),
    ))
}
