//! How a batch of records is stored: one value per stored batch, sealed with a crc32 that is
//! checked on every read, written to the batch files ([`crate::batch_files`]).

use busbar_types::{record_batch, Record, RecordBatch};

use crate::checked;
use crate::StoreError;

/// The stored value of a batch of `records`: their [`RecordBatch`] encoding in the crc32 envelope.
pub fn encode(records: &[Record]) -> Result<Vec<u8>, StoreError> {
    let batch = RecordBatch::encode(records).map_err(|e| StoreError::corrupt("record batch", e.to_string()))?;
    Ok(store(&[&batch]))
}

/// The stored value of the records of `parts` as one batch, in order: one copy of their bytes
/// (merged under a new header when there are several), in the crc32 envelope.
pub fn store(parts: &[&RecordBatch]) -> Vec<u8> {
    match parts {
        [one] => checked::seal(one.as_bytes()),
        _ => checked::seal(&record_batch::merge(parts)),
    }
}

/// The batch's newest timestamp and record count, checking its crc but without decoding every record.
pub fn summary(what: &dyn Fn() -> String, value: &[u8]) -> Result<(i64, u32), StoreError> {
    checked::open(what, value)?;
    header(what, value)
}

/// The newest timestamp and record count from a stored value's header, without checking its crc
/// (for a value just encoded, or checked already).
pub fn header(what: &dyn Fn() -> String, value: &[u8]) -> Result<(i64, u32), StoreError> {
    let payload = value.get(4..).unwrap_or_default();
    // The RecordBatch header: max_timestamp_ms (i64 LE), then the record count (u64 LE).
    let (Some(ts), Some(n)) = (payload.get(..8), payload.get(8..16)) else {
        return Err(StoreError::corrupt(what(), "batch shorter than its header"));
    };
    let ts = i64::from_le_bytes(ts.try_into().unwrap_or_default());
    let n = u64::from_le_bytes(n.try_into().unwrap_or_default());
    Ok((ts, u32::try_from(n).map_err(|_| StoreError::corrupt(what(), "record count above u32"))?))
}

pub fn decode(what: &dyn Fn() -> String, value: &[u8]) -> Result<Vec<Record>, StoreError> {
    let payload = checked::open(what, value)?;
    record_batch::decode(payload).map_err(|e| StoreError::corrupt(what(), e.to_string()))
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
