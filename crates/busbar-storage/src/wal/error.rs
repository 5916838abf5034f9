use std::io;
use std::path::PathBuf;

/// Errors of the write-ahead log.
///
/// `Corrupt` and `Poisoned` are fatal for the node: the log cannot be trusted, and the Raft layer must
/// stop rather than serve or vote from it. The others reject one call and leave the log usable.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("wal: corrupt {} at byte {offset}: {reason}", file.display())]
    Corrupt { file: PathBuf, offset: u64, reason: String },

    #[error("wal: non-contiguous append: expected index {expected}, got {got}")]
    NonContiguous { expected: u64, got: u64 },

    #[error("wal: entry {index} has {len} bytes, above the limit of {max}")]
    EntryTooLarge { index: u64, len: usize, max: usize },

    #[error("wal: index {index} is out of range: {reason}")]
    InvalidIndex { index: u64, reason: &'static str },

    #[error("wal: closed")]
    Closed,

    /// An earlier write or sync failed, so what is on disk is unknown; every later call fails.
    #[error("wal: unusable after an earlier failure: {0}")]
    Poisoned(String),

    /// A flush callback called back into the log with an operation that waits for the syncer thread,
    /// which is the thread running the callback.
    #[error("wal: {0} called from a flush callback would deadlock")]
    Reentrant(&'static str),
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> WalError {
        let path = path.into();
        move |source| WalError::Io { op, path, source }
    }

    pub(crate) fn corrupt(file: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> WalError {
        WalError::Corrupt { file: file.into(), offset, reason: reason.into() }
    }
}
