use std::io;
use std::path::PathBuf;

/// Errors of the topic store. `Corrupt` and `Io`/`Sled` are storage faults (the node cannot serve
/// the data); `UnknownTopicOrPartition` and `OffsetOutOfRange` are answers to a bad request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("corrupt snapshot file {path}: {reason}")]
    CorruptSnapshot { path: PathBuf, reason: String },
    /// A snapshot manifest whose batches this store no longer holds (a newer snapshot was pinned and
    /// reclaim ran, or a snapshot was installed since). Not corruption: the caller takes the newest.
    #[error("snapshot no longer available: {0}")]
    SnapshotUnavailable(String),
    #[error("unknown topic or partition: {topic}/{partition}")]
    UnknownTopicOrPartition { topic: String, partition: u32 },
    #[error("offset {requested} is out of range for {topic}/{partition}: valid offsets are {start}..={end}")]
    OffsetOutOfRange { topic: String, partition: u32, requested: u64, start: u64, end: u64 },
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }

    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt { what: what.into(), reason: reason.into() }
    }
}
