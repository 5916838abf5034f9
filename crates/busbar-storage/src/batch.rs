//! How a batch of records is stored: one value per stored batch, sealed with a crc32 that is
//! checked on every read, written to the batch files ([`crate::batch_files`]).

use busbar_types::record_batch::{self, BatchHeader, RecordEncoding};
use busbar_types::{Record, RecordBatch};
use bytes::Bytes;

use crate::checked;
use crate::StoreError;

/// The stored value of a batch of `records` in `encoding`: their [`RecordBatch`] encoding in the
/// crc32 envelope.
pub fn encode(records: &[Record], encoding: RecordEncoding) -> Result<Vec<u8>, StoreError> {
    let batch =
        RecordBatch::encode(records, encoding).map_err(|e| StoreError::corrupt("record batch", e.to_string()))?;
    store(&[&batch])
}

/// The stored value of the records of `parts` as one batch, in order: one copy of their bytes
/// (merged under a new header when there are several), in the crc32 envelope. The parts share one
/// encoding (apply starts a new batch where the encoding changes).
pub fn store(parts: &[&RecordBatch]) -> Result<Vec<u8>, StoreError> {
    match parts {
        [one] => Ok(checked::seal(one.as_bytes())),
        _ => Ok(checked::seal(
            &record_batch::merge(parts).map_err(|e| StoreError::corrupt("merged record batch", e.to_string()))?,
        )),
    }
}

/// The batch's header (newest timestamp, record count, encoding), checking its crc but without
/// decoding every record.
pub fn summary(what: &dyn Fn() -> String, value: &[u8]) -> Result<BatchHeader, StoreError> {
    checked::open(what, value)?;
    header(what, value)
}

/// The header of a stored value, without checking its crc (for a value just encoded, or checked
/// already).
pub fn header(what: &dyn Fn() -> String, value: &[u8]) -> Result<BatchHeader, StoreError> {
    BatchHeader::read(value.get(checked::ENVELOPE_BYTES..).unwrap_or_default())
        .map_err(|e| StoreError::corrupt(what(), e.to_string()))
}

pub fn decode(what: &dyn Fn() -> String, value: &[u8]) -> Result<Vec<Record>, StoreError> {
    let payload = checked::open(what, value)?;
    record_batch::decode(payload).map_err(|e| StoreError::corrupt(what(), e.to_string()))
}

/// [`decode`] for a read's response: the records' keys and values are slices of `value` (see
/// [`record_batch::decode_shared`]), so each keeps the whole stored batch alive while it lives.
pub fn decode_shared(what: &dyn Fn() -> String, value: Bytes) -> Result<Vec<Record>, StoreError> {
    let payload = value.slice_ref(checked::open(what, &value)?);
    record_batch::decode_shared(&payload).map_err(|e| StoreError::corrupt(what(), e.to_string()))
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
