//! A record as producers send it and consumers receive it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One header: an ordered (name, bytes) pair. Names may repeat; order is preserved byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: Bytes,
}

/// One record. `timestamp_ms` is the producer's timestamp, or the broker's when the producer set none
/// (the broker fills it in on the leader *before* proposing, so every replica stores the same value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    pub timestamp_ms: i64,
}

impl Record {
    /// Bytes this record occupies on the wire and on disk, near enough for size limits.
    pub fn encoded_len_hint(&self) -> usize {
        let headers: usize = self.headers.iter().map(|h| h.name.len() + h.value.len() + 8).sum();
        self.key.as_ref().map_or(0, Bytes::len) + self.value.len() + headers + 24
    }
}
