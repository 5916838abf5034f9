//! The syncer thread: one fdatasync round covers every append written before the round started.

use std::io;
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::{format, lock, Shared};

pub(super) fn run(sh: &Shared) {
    loop {
        let (callbacks, files, dir_dirty, upto, end, poisoned) = {
            let mut st = lock(&sh.state);
            while st.pending.is_empty() && !st.stopping {
                st = sh.wake_syncer.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.pending.is_empty() {
                return;
            }
            // Everything queued so far was written before it was queued, so this round's fsyncs cover it.
            (
                mem::take(&mut st.pending),
                mem::take(&mut st.dirty),
                mem::take(&mut st.dir_dirty),
                st.submitted,
                st.pending_end.take(),
                st.poisoned.clone(),
            )
        };
        #[cfg(test)]
        let gate = lock(&sh.sync_gate);

        let result = match poisoned {
            // No fsync after a failure: it could report success for pages the kernel already dropped.
            Some(reason) => Err(io::Error::other(format!("wal poisoned: {reason}"))),
            None => sync(sh, &files, dir_dirty).and_then(|()| {
                // A rotation's fdatasync of the same file, failing meanwhile, consumed the error the
                // kernel reports once per open file: this round's "success" may cover lost pages.
                match &lock(&sh.state).poisoned {
                    Some(reason) => Err(io::Error::other(format!("wal poisoned during the round: {reason}"))),
                    None => Ok(()),
                }
            }),
        };
        #[cfg(test)]
        drop(gate);
        sh.sync_count.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            // Poison before any callback learns of the failure, so no caller can act on it and then find
            // the log still accepting writes.
            sh.fail(super::WalError::Poisoned(format!("fdatasync failed: {e}")));
        }

        for cb in callbacks {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            if catch_unwind(AssertUnwindSafe(move || cb(r))).is_err() {
                tracing::error!("wal: a flush callback panicked; later callbacks still run");
            }
        }

        let mut st = lock(&sh.state);
        st.completed = upto;
        if result.is_ok() && end.is_some() {
            st.synced_end = end;
        }
        sh.round_done.notify_all();
    }
}

fn sync(sh: &Shared, files: &[(u64, std::sync::Arc<std::fs::File>)], dir_dirty: bool) -> io::Result<()> {
    for (_, file) in files {
        file.sync_data()?;
    }
    if dir_dirty {
        format::sync_dir(&sh.dir).map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}
