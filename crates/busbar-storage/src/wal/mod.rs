//! The Raft write-ahead log: append-only segment files of crc-checked frames, with group commit.
//!
//! The log stores opaque payloads under contiguous u64 indexes; the Raft adapter decides what they hold.
//! What the Raft layer relies on (openraft's storage contract):
//! - `append` has *written* the entries (page cache; `read` sees them) when it returns, and calls `done`
//!   only once they are *flushed* (fdatasync). One fdatasync covers every append written before it
//!   started; that is the group commit which makes small appends cheap.
//! - `truncate`, `purge` and `save_vote` are durable when they return, and first flush and complete every
//!   earlier append, so all writes take effect in submission order.
//! - `purge` persists the purge point before it removes anything.
//!
//! Write path, in order: encode the whole call into one buffer (outside any lock) → under the writer
//! lock, rotate if the active segment is full (fdatasync the old segment, create the new one) → one
//! pwrite at the segment's end → publish the positions in the index and queue `done` → the syncer thread
//! takes every queued callback, fdatasyncs each segment written since its last round (and the directory if
//! a segment was created), then fires the callbacks in submission order.
//!
//! Files in the directory: `NNNNNNNNNNNNNNNNNNNN.seg` (20-digit index of the first frame), `vote`,
//! `purged`, `synced`; see `format` and `synced_mark` for their bytes and `recovery` for what opening
//! repairs and what it refuses.

mod error;
mod format;
mod recovery;
mod synced_mark;
mod syncer;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use bytes::Bytes;

pub use error::WalError;
pub use format::{FRAME_HEADER, MAX_ENTRY_BYTES};

/// Called once per `append`, from the syncer thread, with the result of the fdatasync that covered it.
/// It must not block for long (it delays every later acknowledgement) and must not call the mutating
/// methods (`append`, `truncate`, `purge`, `save_vote`, `close`): they can wait for the syncer, which is
/// the thread running the callback. Reads are fine.
pub type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send + 'static>;

#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment is started by the first append after the active one reaches this size. One append
    /// never spans two segments, so a segment can exceed this by one append's bytes.
    pub segment_bytes: u64,
    /// How often a background thread records the last synced index in the `synced` file, which
    /// recovery checks the log against (see `synced_mark`). `None`: never (the log then cannot
    /// tell a segment cut at a frame boundary from a torn tail).
    pub synced_mark_every: Option<Duration>,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: 64 << 20, synced_mark_every: Some(Duration::from_millis(200)) }
    }
}

/// A handle on an open log. Clones share it; readers and the writer may use it from any thread.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

/// Owned by the `Wal` handles only, so that dropping the last handle stops the syncer (which holds
/// `Shared`, not `Inner`).
struct Inner {
    shared: Arc<Shared>,
    syncer: Mutex<Option<JoinHandle<()>>>,
    syncer_id: ThreadId,
    marker: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    opts: WalOptions,
    /// Serialises the mutating calls so that they reach the disk in submission order. Held across their
    /// file IO; never taken by readers or the syncer.
    writer: Mutex<()>,
    state: Mutex<State>,
    /// Readers hold it shared from looking up a position until their pread is done; `truncate` holds it
    /// exclusively while it cuts files. Without it a reader could pread a frame that was just cut off, or
    /// rewritten at the same offset by an append after the truncate.
    cut: RwLock<()>,
    /// Wakes the syncer when callbacks are queued or it must stop.
    wake_syncer: Condvar,
    /// The synced mark. Taken before `state` when both are needed; held across the mark's write so
    /// that a truncate's lowered mark is never overwritten by a higher one read before it.
    mark: Mutex<synced_mark::SyncedMark>,
    /// Wakes the mark writer early when it must stop.
    wake_marker: Condvar,
    /// Signalled by the syncer after each round, for calls that wait until all appends are flushed.
    round_done: Condvar,
    sync_count: AtomicU64,
    /// Lets a unit test hold the syncer between rounds to observe group commit deterministically.
    #[cfg(test)]
    sync_gate: Mutex<()>,
}

struct Segment {
    /// Index of the segment's first frame; also its file name.
    base: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of whole frames; appends write here.
    len: u64,
}

/// Where one live entry is. The index keeps only this per entry, so memory is 16 bytes per entry.
#[derive(Debug, Clone, Copy)]
struct Pos {
    offset: u64,
    /// Payload length; the frame is `FRAME_HEADER + len` bytes.
    len: u32,
}

struct State {
    segments: VecDeque<Segment>,
    /// Positions of the live entries `first ..= first + index.len() - 1`. Entries at or below the purge
    /// point may still be on disk, in the oldest segment, but are not in here.
    index: VecDeque<Pos>,
    first: u64,
    purged: Option<(u64, Bytes)>,
    vote: Option<Bytes>,
    /// Callbacks of appends written but not yet covered by an fdatasync, in submission order.
    pending: Vec<FlushCallback>,
    /// The end (last index + 1) of what the appends in `pending` wrote (`None` if they wrote none).
    pending_end: Option<u64>,
    /// The end of what fdatasync rounds have covered since open, for the synced mark. Starts unset:
    /// entries found at open may be in the page cache only (after a process crash) until the next
    /// round syncs their segment.
    synced_end: Option<u64>,
    /// Segments written since the syncer last took this list (by base, deduplicated).
    dirty: Vec<(u64, Arc<File>)>,
    /// A segment was created since the syncer's last round: its directory entry must be made durable too.
    dir_dirty: bool,
    /// Appends queued so far, and appends whose callbacks have fired: all are flushed when equal.
    submitted: u64,
    completed: u64,
    poisoned: Option<String>,
    closed: bool,
    stopping: bool,
}

impl State {
    fn last(&self) -> Option<u64> {
        (!self.index.is_empty()).then(|| self.first + self.index.len() as u64 - 1)
    }

    /// The index the next append must start at; `None` when any index will do (empty, never purged).
    fn next_index(&self) -> Option<u64> {
        match (self.last(), &self.purged) {
            (Some(last), _) => Some(last + 1),
            (None, Some((p, _))) => Some(p.saturating_add(1)),
            (None, None) => None,
        }
    }

    /// See `Shared::fail`; for callers already holding the state lock.
    fn poison(&mut self, err: WalError) -> WalError {
        if self.poisoned.is_none() {
            tracing::error!(error = %err, "wal: poisoned, every later call will fail");
            self.poisoned = Some(err.to_string());
        }
        err
    }

    fn usable(&self) -> Result<(), WalError> {
        if let Some(reason) = &self.poisoned {
            return Err(WalError::Poisoned(reason.clone()));
        }
        if self.closed {
            return Err(WalError::Closed);
        }
        Ok(())
    }

    /// The segment holding live entry `index`: the last one whose first index is not above it.
    fn segment_of(&self, index: u64) -> Option<usize> {
        self.segments.partition_point(|s| s.base <= index).checked_sub(1)
    }

    fn pos(&self, index: u64) -> Option<Pos> {
        let i = usize::try_from(index.checked_sub(self.first)?).ok()?;
        self.index.get(i).copied()
    }
}

/// Locks ignoring std's poisoning: no code holding these locks panics (no unwrap, callbacks run outside
/// them and are caught), and the log's own poisoning covers IO failures.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Wal {
    /// Opens the log in `dir` (created if missing) and recovers it. Fails with `WalError::Corrupt` if the
    /// log is damaged anywhere but in a torn tail of its last segment.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, WalError> {
        let rec = recovery::recover(dir)?;
        // A process crash may have come between a segment's creation and the round that fsyncs the
        // directory: the first round after open makes the entries of the segments found durable.
        let dir_dirty = !rec.segments.is_empty();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            writer: Mutex::new(()),
            state: Mutex::new(State {
                segments: rec.segments,
                index: rec.index,
                first: rec.first,
                purged: rec.purged,
                vote: rec.vote,
                pending: Vec::new(),
                pending_end: None,
                synced_end: None,
                dirty: Vec::new(),
                dir_dirty,
                submitted: 0,
                completed: 0,
                poisoned: None,
                closed: false,
                stopping: false,
            }),
            cut: RwLock::new(()),
            wake_syncer: Condvar::new(),
            mark: Mutex::new(rec.mark),
            wake_marker: Condvar::new(),
            round_done: Condvar::new(),
            sync_count: AtomicU64::new(0),
            #[cfg(test)]
            sync_gate: Mutex::new(()),
        });
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("busbar-wal-sync".into())
            .spawn(move || syncer::run(&for_thread))
            .map_err(WalError::io("spawn syncer thread for", dir))?;
        let syncer_id = handle.thread().id();
        let marker = match shared.opts.synced_mark_every {
            Some(every) => {
                let for_thread = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("busbar-wal-mark".into())
                    .spawn(move || synced_mark::run(&for_thread, every));
                match spawned {
                    Ok(h) => Some(h),
                    Err(e) => {
                        stop_threads(&shared, Some(handle), None);
                        return Err(WalError::io("spawn synced-mark thread for", dir)(e));
                    }
                }
            }
            None => None,
        };
        Ok(Wal {
            inner: Arc::new(Inner { shared, syncer: Mutex::new(Some(handle)), syncer_id, marker: Mutex::new(marker) }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// First live entry (above the purge point).
    pub fn first_index(&self) -> Option<u64> {
        let st = lock(&self.inner.shared.state);
        (!st.index.is_empty()).then_some(st.first)
    }

    pub fn last_index(&self) -> Option<u64> {
        lock(&self.inner.shared.state).last()
    }

    /// The last purge point and the meta bytes given to `purge` with it.
    pub fn purged(&self) -> Option<(u64, Bytes)> {
        lock(&self.inner.shared.state).purged.clone()
    }

    pub fn vote(&self) -> Option<Bytes> {
        lock(&self.inner.shared.state).vote.clone()
    }

    /// What the synced mark on disk says: every index below it was fdatasynced (0: nothing yet).
    pub fn synced_mark(&self) -> u64 {
        lock(&self.inner.shared.mark).end()
    }

    /// Number of syncer rounds (each one fdatasync per written segment) since open; for tests and benches.
    pub fn sync_count(&self) -> u64 {
        self.inner.shared.sync_count.load(Ordering::Relaxed)
    }

    /// The live entry at `index`, or `None` if there is none. The frame's checksum is verified.
    pub fn read(&self, index: u64) -> Result<Option<Bytes>, WalError> {
        let sh = &self.inner.shared;
        let _cut = sh.cut.read().unwrap_or_else(PoisonError::into_inner);
        let (file, path, pos) = {
            let st = lock(&sh.state);
            st.usable()?;
            let (Some(pos), Some(seg)) = (st.pos(index), st.segment_of(index)) else {
                return Ok(None);
            };
            let seg = &st.segments[seg];
            (Arc::clone(&seg.file), seg.path.clone(), pos)
        };
        let mut buf = vec![0u8; FRAME_HEADER + pos.len as usize];
        file.read_exact_at(&mut buf, pos.offset).map_err(WalError::io("read", &path))?;
        let len = format::check_frame(&buf, index, &path, pos.offset)?;
        if len != pos.len as usize {
            return Err(WalError::corrupt(&path, pos.offset, format!("frame length {len}, indexed as {}", pos.len)));
        }
        Ok(Some(Bytes::from(buf).slice(FRAME_HEADER..)))
    }

    /// The live entries with `start <= index < end`, in order, each checksum verified. Entries of one
    /// segment are read with a single pread.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<(u64, Bytes)>, WalError> {
        struct Run {
            file: Arc<File>,
            path: PathBuf,
            first: u64,
            count: u64,
            from: u64,
            to: u64,
        }
        let sh = &self.inner.shared;
        let _cut = sh.cut.read().unwrap_or_else(PoisonError::into_inner);
        let runs = {
            let st = lock(&sh.state);
            st.usable()?;
            let Some(last) = st.last() else { return Ok(Vec::new()) };
            let (start, end) = (start.max(st.first), end.min(last + 1));
            let mut runs = Vec::new();
            let mut i = start;
            while i < end {
                let (Some(s), Some(first_pos)) = (st.segment_of(i), st.pos(i)) else { break };
                let seg = &st.segments[s];
                let run_end = st.segments.get(s + 1).map_or(end, |next| next.base.min(end));
                let Some(last_pos) = st.pos(run_end - 1) else { break };
                runs.push(Run {
                    file: Arc::clone(&seg.file),
                    path: seg.path.clone(),
                    first: i,
                    count: run_end - i,
                    from: first_pos.offset,
                    to: last_pos.offset + (FRAME_HEADER as u64) + u64::from(last_pos.len),
                });
                i = run_end;
            }
            runs
        };
        let mut out = Vec::with_capacity(runs.iter().map(|r| r.count as usize).sum());
        for run in runs {
            let mut buf = vec![0u8; (run.to - run.from) as usize];
            run.file.read_exact_at(&mut buf, run.from).map_err(WalError::io("read", &run.path))?;
            let buf = Bytes::from(buf);
            let mut at = 0usize;
            for index in run.first..run.first + run.count {
                let offset = run.from + at as u64;
                let len = format::check_frame(&buf[at..], index, &run.path, offset)?;
                out.push((index, buf.slice(at + FRAME_HEADER..at + FRAME_HEADER + len)));
                at += FRAME_HEADER + len;
            }
            if at != buf.len() {
                return Err(WalError::corrupt(&run.path, run.from + at as u64, "frames end before the indexed extent"));
            }
        }
        Ok(out)
    }

    /// Writes `entries` into the page cache before returning (so reads see them at once) and calls `done`
    /// from the syncer thread after an fdatasync covering them. Indexes must be contiguous and continue the
    /// log (`last_index + 1`, or purge point + 1); an empty, never purged log accepts any start. An empty
    /// `entries` still gets `done` after the next fdatasync, i.e. once all earlier appends are flushed.
    pub fn append(&self, entries: Vec<(u64, Bytes)>, done: FlushCallback) -> Result<(), WalError> {
        let sh = &self.inner.shared;
        // Validation and encoding need no lock; doing them first keeps the writer lock to the IO itself.
        for pair in entries.windows(2) {
            if pair[0].0.checked_add(1) != Some(pair[1].0) {
                return Err(WalError::NonContiguous { expected: pair[0].0.saturating_add(1), got: pair[1].0 });
            }
        }
        let mut buf = Vec::with_capacity(entries.iter().map(|(_, p)| FRAME_HEADER + p.len()).sum());
        let mut positions = Vec::with_capacity(entries.len());
        for (index, payload) in &entries {
            if *index == u64::MAX {
                return Err(WalError::InvalidIndex { index: *index, reason: "u64::MAX is reserved" });
            }
            if payload.len() > MAX_ENTRY_BYTES {
                return Err(WalError::EntryTooLarge { index: *index, len: payload.len(), max: MAX_ENTRY_BYTES });
            }
            positions.push(Pos { offset: buf.len() as u64, len: payload.len() as u32 });
            format::encode_frame(&mut buf, *index, payload);
        }

        let _w = lock(&sh.writer);
        let active = {
            let mut st = lock(&sh.state);
            st.usable()?;
            let Some((first_new, _)) = entries.first() else {
                st.pending.push(done);
                st.submitted += 1;
                sh.wake_syncer.notify_one();
                return Ok(());
            };
            if let Some(expected) = st.next_index() {
                if *first_new != expected {
                    return Err(WalError::NonContiguous { expected, got: *first_new });
                }
            }
            match st.segments.back() {
                Some(s) if s.len < sh.opts.segment_bytes => None,
                Some(s) => Some(Some((Arc::clone(&s.file), s.path.clone()))),
                None => Some(None),
            }
        };
        let first_new = entries[0].0;
        if let Some(full) = active {
            // Flush the full segment before starting the next: then only the last segment can ever hold
            // a torn tail, which is what lets recovery treat damage anywhere else as corruption. It costs
            // one extra fdatasync per segment.
            if let Some((file, path)) = full {
                if let Err(e) = file.sync_data() {
                    return Err(sh.fail(WalError::io("fsync", path)(e)));
                }
            }
            let path = format::segment_path(&sh.dir, first_new);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(WalError::io("create", &path))?;
            let mut st = lock(&sh.state);
            st.segments.push_back(Segment { base: first_new, path, file: Arc::new(file), len: 0 });
            st.dir_dirty = true;
        }

        let (file, path, offset, base) = {
            let mut st = lock(&sh.state);
            let Some(seg) = st.segments.back() else {
                return Err(st.poison(WalError::Poisoned("no active segment after rotation".into())));
            };
            (Arc::clone(&seg.file), seg.path.clone(), seg.len, seg.base)
        };
        // One write for the whole call, at the known end: a crash mid-append tears only the tail.
        if let Err(e) = file.write_all_at(&buf, offset) {
            // Part of the buffer may be in the file past the indexed end; what is on disk is unknown.
            return Err(sh.fail(WalError::io("write", path)(e)));
        }

        let mut st = lock(&sh.state);
        if st.index.is_empty() {
            st.first = first_new;
        }
        st.index.extend(positions.into_iter().map(|p| Pos { offset: offset + p.offset, len: p.len }));
        if let Some(seg) = st.segments.back_mut() {
            seg.len += buf.len() as u64;
        }
        if st.dirty.last().map(|(b, _)| *b) != Some(base) {
            st.dirty.push((base, file));
        }
        st.pending_end = st.last().map(|l| l.saturating_add(1));
        st.pending.push(done);
        st.submitted += 1;
        sh.wake_syncer.notify_one();
        Ok(())
    }

    /// Removes every entry with index `>= from`, durably, after flushing and completing earlier appends.
    pub fn truncate(&self, from: u64) -> Result<(), WalError> {
        let sh = &self.inner.shared;
        let _w = lock(&sh.writer);
        self.flush_pending("truncate")?;
        // The mark first: once entries are cut it must not claim them, or recovery would refuse the log.
        // Where the log will end: at `from`, or, if nothing live is left, after the purge point (a
        // never purged log that is emptied may start anywhere next).
        let end_after = {
            let st = lock(&sh.state);
            if !st.index.is_empty() && from > st.first {
                from
            } else {
                st.purged.as_ref().map_or(0, |(p, _)| p.saturating_add(1))
            }
        };
        sh.lower_mark(end_after).map_err(|e| sh.fail(e))?;
        let _cut = sh.cut.write().unwrap_or_else(PoisonError::into_inner);
        let (removed, cut) = {
            let mut st = lock(&sh.state);
            st.usable()?;
            let Some(last) = st.last() else { return Ok(()) };
            if from > last {
                return Ok(());
            }
            // Entries at or below the purge point are not in the log any more; cutting at the first live
            // entry keeps them hidden on disk rather than touching the purge point's bookkeeping.
            let from = from.max(st.first);
            let (Some(s), Some(pos)) = (st.segment_of(from), st.pos(from)) else {
                return Err(st.poison(WalError::Poisoned(format!("index {from} is live but has no segment"))));
            };
            let keep_from = if pos.offset == 0 { s } else { s + 1 };
            let removed: Vec<Segment> = st.segments.drain(keep_from..).collect();
            let cut = if pos.offset == 0 {
                None
            } else {
                let seg = &mut st.segments[s];
                seg.len = pos.offset;
                Some((Arc::clone(&seg.file), seg.path.clone(), pos.offset))
            };
            let keep = (from - st.first) as usize;
            st.index.truncate(keep);
            (removed, cut)
        };
        // Newest first, each unlink made durable before the next: a crash part way leaves a shorter log
        // that is still contiguous, never a gap.
        for seg in removed.iter().rev() {
            if let Err(e) = std::fs::remove_file(&seg.path) {
                return Err(sh.fail(WalError::io("remove", &seg.path)(e)));
            }
            format::sync_dir(&sh.dir).map_err(|e| sh.fail(e))?;
        }
        if let Some((file, path, at)) = cut {
            if let Err(e) = file.set_len(at).and_then(|()| file.sync_data()) {
                return Err(sh.fail(WalError::io("truncate", path)(e)));
            }
        }
        Ok(())
    }

    /// Records the purge point `(index, meta)` durably, then drops every entry `<= index`. Segments wholly
    /// at or below it are deleted; the rest of a partly purged segment stays on disk, hidden. A purge point
    /// not above the current one is ignored. `index` may be past the last entry (after a snapshot is
    /// installed); the log is then empty and continues at `index + 1`.
    pub fn purge(&self, index: u64, meta: Bytes) -> Result<(), WalError> {
        let sh = &self.inner.shared;
        let _w = lock(&sh.writer);
        self.flush_pending("purge")?;
        {
            let st = lock(&sh.state);
            st.usable()?;
            if st.purged.as_ref().is_some_and(|(p, _)| index <= *p) {
                return Ok(());
            }
            // Recovery requires the log to resume right after the purge point; a point further below the
            // first entry would read back as missing entries.
            if !st.index.is_empty() && index.saturating_add(1) < st.first {
                return Err(WalError::InvalidIndex { index, reason: "purge point below the first entry - 1" });
            }
        }
        format::write_meta(&sh.dir, format::PURGED_FILE, &format::encode_purged(index, &meta))
            .map_err(|e| sh.fail(e))?;

        let removed = {
            let mut st = lock(&sh.state);
            let drop_n = usize::try_from(index.saturating_add(1).saturating_sub(st.first)).unwrap_or(usize::MAX);
            let drop_n = drop_n.min(st.index.len());
            st.index.drain(..drop_n);
            st.first = index.saturating_add(1).max(st.first);
            st.purged = Some((index, meta));
            let mut removed = Vec::new();
            while !st.segments.is_empty() {
                let wholly_purged = match st.segments.get(1) {
                    Some(next) => next.base <= index.saturating_add(1),
                    None => st.index.is_empty(),
                };
                if !wholly_purged {
                    break;
                }
                if let Some(seg) = st.segments.pop_front() {
                    removed.push(seg);
                }
            }
            removed
        };
        // Oldest first and one directory fsync for all: recovery drops leftovers below the purge point by
        // name, so a crash part way through is harmless.
        for seg in &removed {
            if let Err(e) = std::fs::remove_file(&seg.path) {
                return Err(sh.fail(WalError::io("remove", &seg.path)(e)));
            }
        }
        if !removed.is_empty() {
            format::sync_dir(&sh.dir).map_err(|e| sh.fail(e))?;
        }
        Ok(())
    }

    /// Replaces the vote durably (after flushing and completing earlier appends).
    pub fn save_vote(&self, vote: Bytes) -> Result<(), WalError> {
        let sh = &self.inner.shared;
        let _w = lock(&sh.writer);
        self.flush_pending("save_vote")?;
        format::write_meta(&sh.dir, format::VOTE_FILE, &vote).map_err(|e| sh.fail(e))?;
        lock(&sh.state).vote = Some(vote);
        Ok(())
    }

    /// Flushes and completes every pending append, stops the syncer thread, and makes every later call
    /// fail with `Closed`. Fails if the final flush failed.
    pub fn close(&self) -> Result<(), WalError> {
        let sh = &self.inner.shared;
        if std::thread::current().id() == self.inner.syncer_id {
            return Err(WalError::Reentrant("close"));
        }
        let _w = lock(&sh.writer);
        {
            let mut st = lock(&sh.state);
            if st.closed {
                return Err(WalError::Closed);
            }
            // Closed at once, so no append slips in; the syncer still drains what is queued.
            st.closed = true;
            st.stopping = true;
            sh.wake_syncer.notify_one();
            sh.wake_marker.notify_one();
        }
        if let Some(handle) = lock(&self.inner.syncer).take() {
            if handle.join().is_err() {
                return Err(WalError::Poisoned("the syncer thread panicked".into()));
            }
        }
        if let Some(handle) = lock(&self.inner.marker).take() {
            if handle.join().is_err() {
                return Err(WalError::Poisoned("the synced-mark thread panicked".into()));
            }
            // Everything is synced now: a graceful stop leaves an exact mark.
            sh.advance_mark().map_err(|e| sh.fail(e))?;
        }
        match &lock(&sh.state).poisoned {
            Some(reason) => Err(WalError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Waits until every append queued so far has been flushed and its callback has fired.
    fn flush_pending(&self, op: &'static str) -> Result<(), WalError> {
        if std::thread::current().id() == self.inner.syncer_id {
            return Err(WalError::Reentrant(op));
        }
        let sh = &self.inner.shared;
        let mut st = lock(&sh.state);
        st.usable()?;
        let target = st.submitted;
        while st.completed < target && st.poisoned.is_none() {
            sh.wake_syncer.notify_one();
            st = sh.round_done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.usable()
    }
}

impl Shared {
    /// Marks the log unusable and hands the error back. After a failed write or fsync the kernel may have
    /// dropped the dirty pages and cleared the error, so a retried fsync can "succeed" without the data
    /// ever reaching the disk (PostgreSQL's "fsyncgate", 2018). The page cache can no longer be trusted
    /// to match the disk; only a restart, which re-reads the disk, can.
    fn fail(&self, err: WalError) -> WalError {
        let err = lock(&self.state).poison(err);
        self.round_done.notify_all();
        err
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let syncer = lock(&self.syncer).take();
        // The last handle can be dropped by a callback on the syncer thread itself; it must not join itself.
        let syncer = syncer.filter(|_| std::thread::current().id() != self.syncer_id);
        stop_threads(&self.shared, syncer, lock(&self.marker).take());
    }
}

/// Tells the syncer and the mark writer to stop, and waits for them (the syncer first drains what is
/// queued).
fn stop_threads(sh: &Shared, syncer: Option<JoinHandle<()>>, marker: Option<JoinHandle<()>>) {
    {
        let mut st = lock(&sh.state);
        st.stopping = true;
        sh.wake_syncer.notify_one();
        sh.wake_marker.notify_one();
    }
    for handle in [syncer, marker].into_iter().flatten() {
        let _ = handle.join();
    }
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.inner.shared.state);
        f.debug_struct("Wal")
            .field("dir", &self.inner.shared.dir)
            .field("first", &(!st.index.is_empty()).then_some(st.first))
            .field("last", &st.last())
            .field("segments", &st.segments.len())
            .field("purged", &st.purged.as_ref().map(|(i, _)| *i))
            .finish()
    }
}
