//! Making sled's files durable against power loss, not only against a process crash.
//!
//! sled 0.34's `flush()` writes through `sync_file_range` on Linux, which survives a crash of the
//! process but not of the machine (see docs/storage.md). Busbar purges the Raft log below the
//! applied index only after the state machine is durable, so after `flush()` we fsync every file of
//! the sled directory and the directories themselves (fsync on any descriptor of a file flushes that
//! file's dirty pages and metadata) — except the batch files' directory, which `BatchFiles::sync`
//! has just made durable: its files, and the directory itself whenever an entry was created or
//! removed since its last sync, or it was opened after a crash.

use std::fs::File;
use std::path::Path;

use crate::StoreError;

/// fsyncs every file and directory under `dir` except the directories in `skip` and what is in
/// them (made durable by their owner: the batch files sync only the files written and the
/// directory changed since their last sync).
pub fn fsync_tree(dir: &Path, skip: &[&Path]) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            if !skip.contains(&path.as_path()) {
                fsync_tree(&path, skip)?;
            }
        } else if ft.is_file() {
            fsync_if_present(&path)?;
        }
    }
    fsync_path(dir)
}

/// fsync one file or directory by path.
pub fn fsync_path(path: &Path) -> Result<(), StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(format!("open {} for fsync", path.display()), e))?;
    f.sync_all().map_err(|e| StoreError::io(format!("fsync {}", path.display()), e))
}

/// Like [`fsync_path`], for a file sled may delete at any moment (a blob of a value that was
/// replaced or removed): one that is gone has nothing left to make durable.
fn fsync_if_present(path: &Path) -> Result<(), StoreError> {
    match File::open(path) {
        Ok(f) => f.sync_all().map_err(|e| StoreError::io(format!("fsync {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("open {} for fsync", path.display()), e)),
    }
}
