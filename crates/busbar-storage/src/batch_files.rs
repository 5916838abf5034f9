//! The files that hold stored record batches. sled keeps only a [`BatchRef`] per batch (where it is,
//! its checksum and a summary); the bytes live here, written once.
//!
//! Why not in sled: sled 0.34 keeps up to 16 values in one leaf and rewrites the whole leaf on every
//! consolidation and split, and stores a leaf above ~128 KiB as a file of its own. With batches of
//! tens or hundreds of KiB every byte was written several times and the store took 1.2–1.4× the
//! payload on disk (profile and figures in docs/benchmarks.md).
//!
//! Layout: `<store>/batches/<seq, 16 hex digits>.batches`, each file a run of stored batches (the
//! crc-sealed values of [`crate::batch`]) back to back, appended only. A file belongs to one
//! generation of the store; each generation appends to its own active file until it holds
//! [`FILE_BYTES`], then starts the next. A file whose batches are all deleted is unlinked. After a
//! restart nothing is appended to an existing file: a torn tail stays dead space.
//!
//! Files interleave the batches of every partition, so one batch still retained keeps its whole file.
//! Each file therefore counts the bytes its references name ([`BatchFiles::usage`]), and the
//! store's compaction copies the live batches of mostly dead files into a file of their own
//! ([`Lane::Compaction`]) so that the old ones can go (`TopicStore::compact`).
//!
//! Durability: nothing is synced on append (the Raft log holds every entry above the last snapshot).
//! [`BatchFiles::sync`] fdatasyncs every file written since the last sync and fsyncs the directory;
//! the store calls it before sled's flush, and records how far each file was synced, so that at open
//! it can tell which references may point past what reached the disk before a power loss.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::{batch, checked, durable, StoreError};

/// A file is closed for appends once it holds this many bytes (a batch larger than the rest of the
/// file still goes in whole). The default of `TopicStoreOptions::batch_file_bytes`.
pub const FILE_BYTES: u64 = 64 << 20;

/// Who appends: each lane of a generation has its own active file, so that a file has one appender
/// at a time (its appends then complete in the order their positions were handed out, which
/// `written` relies on). Apply (and import and open) append under the store's apply lock;
/// compaction appends under its own lock, copying old batches, without holding apply up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Apply,
    Compaction,
}

const SUFFIX: &str = ".batches";

/// Where a stored batch is and what it holds: the value of the records tree in sled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRef {
    /// The file's sequence number.
    pub file: u64,
    pub pos: u64,
    /// Length of the stored value (crc + batch encoding): what partition byte counts add up.
    pub len: u32,
    /// The value's crc32 (its first four bytes): a reference and the bytes it finds must agree.
    pub crc: u32,
    /// Newest record timestamp and record count, so retention and accounting need not read the file.
    pub max_ts: i64,
    pub count: u32,
}

impl BatchRef {
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        checked::seal_bincode("batch reference", self)
    }

    pub fn decode(what: &dyn Fn() -> String, value: &[u8]) -> Result<Self, StoreError> {
        checked::open_bincode(what, value)
    }

    pub fn end(&self) -> u64 {
        self.pos + u64::from(self.len)
    }
}

struct OpenFile {
    file: Arc<File>,
    generation: Option<u64>,
    /// Bytes handed out to appends: the next append goes here.
    len: u64,
    /// Bytes whose writes have completed, in order from the start: what a sync may claim. Behind
    /// `len` only while an append writes (outside the lock).
    written: u64,
    /// References to batches in it, as the store counts them.
    live: u64,
    /// Bytes those references name; the rest of `len` is dead (deleted batches, a torn tail).
    live_bytes: u64,
}

#[derive(Default)]
struct State {
    files: BTreeMap<u64, OpenFile>,
    /// Per generation and lane, the file it appends to.
    active: BTreeMap<(u64, Lane), u64>,
    next_seq: u64,
    /// Written since a sync last covered them. A file leaves the set only once an fdatasync that
    /// began after its last completed write has finished, so concurrent syncs never claim what
    /// another one is still syncing (each syncs what it finds here itself).
    dirty: BTreeSet<u64>,
    /// Files created or unlinked: counts each change of the directory. `dir_synced` is the count
    /// the last finished directory fsync covered.
    dir_changes: u64,
    dir_synced: u64,
    /// A sync failed. No later sync may report success: the kernel may have dropped the pages that
    /// failed to write (the WAL does the same).
    poisoned: Option<String>,
}

pub struct BatchFiles {
    dir: PathBuf,
    /// When a file is closed for appends ([`FILE_BYTES`] unless a test wants small files).
    file_bytes: u64,
    state: Mutex<State>,
}

/// What [`BatchFiles::usage`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationUse {
    /// The files closed for appends, emptiest first.
    pub closed: Vec<FileUse>,
    /// Bytes of all the generation's files.
    pub held: u64,
    /// How many of those bytes references name.
    pub live: u64,
}

/// A file closed for appends, with how much of it is still referenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileUse {
    pub seq: u64,
    pub len: u64,
    pub live_bytes: u64,
}

fn lock_err<T>(_: T) -> StoreError {
    StoreError::corrupt("batch files lock", "a thread panicked while holding it")
}

impl BatchFiles {
    /// Opens every batch file in `dir` (created if missing) for reading. Appends go to new files,
    /// each closed once it holds `file_bytes`.
    pub fn open(dir: &Path, file_bytes: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let mut st = State::default();
        let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(seq) = name.strip_suffix(SUFFIX).and_then(|s| u64::from_str_radix(s, 16).ok()) else {
                continue;
            };
            let path = entry.path();
            let file = File::open(&path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
            let len = file.metadata().map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?.len();
            st.files.insert(
                seq,
                OpenFile { file: Arc::new(file), generation: None, len, written: len, live: 0, live_bytes: 0 },
            );
            // After a process crash its tail may still be in the page cache only: the next sync
            // covers it before any sync mark does.
            st.dirty.insert(seq);
            st.next_seq = st.next_seq.max(seq + 1);
        }
        // Nor may the directory entries of files created just before a crash be durable yet:
        // the first sync fsyncs the directory too (the store's own flush skips it).
        st.dir_changes = u64::from(!st.files.is_empty());
        Ok(Self { dir: dir.to_path_buf(), file_bytes: file_bytes.max(1), state: Mutex::new(st) })
    }

    /// The directory the files live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}{SUFFIX}"))
    }

    /// Appends a stored batch value for `generation`; returns (file, position). Not synced. Counts
    /// the reference the caller is about to store at once, so the file cannot be unlinked between
    /// the write and the commit of that reference (if the commit fails, the count stays one too
    /// high until the next open: the file lives a little longer, nothing is lost).
    ///
    /// The write runs outside the lock, so readers (which take it to find a file) never wait for
    /// it. Each lane appends from one thread at a time (see [`Lane`]), so a file's appends complete
    /// in the order their positions were handed out.
    fn append(&self, generation: u64, lane: Lane, value: &[u8]) -> Result<(u64, u64), StoreError> {
        let (seq, pos, file) = self.reserve(generation, lane, value.len() as u64)?;
        let wrote = file.write_all_at(value, pos);
        let mut st = self.state.lock().map_err(lock_err)?;
        if let Some(f) = st.files.get_mut(&seq) {
            // Only a contiguous completion moves the mark: a sync never claims a byte not written.
            // (One appender at a time keeps completions contiguous; see above.)
            debug_assert_eq!(f.written, pos, "batch-file appends overlapped");
            if wrote.is_ok() && f.written == pos {
                f.written = pos + value.len() as u64;
            }
        }
        st.dirty.insert(seq);
        wrote.map_err(|e| StoreError::io(format!("write {}", self.path(seq).display()), e))?;
        Ok((seq, pos))
    }

    /// Hands out `n` bytes at the end of the active file of `generation`'s `lane` (starting a new
    /// file when it is full) and counts the reference that will name them.
    fn reserve(&self, generation: u64, lane: Lane, n: u64) -> Result<(u64, u64, Arc<File>), StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        let active = st
            .active
            .get(&(generation, lane))
            .copied()
            .filter(|seq| st.files.get(seq).is_some_and(|f| f.len == 0 || f.len + n <= self.file_bytes));
        let seq = match active {
            Some(seq) => seq,
            None => {
                let seq = st.next_seq;
                let path = self.path(seq);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
                st.next_seq += 1;
                st.files.insert(
                    seq,
                    OpenFile {
                        file: Arc::new(file),
                        generation: Some(generation),
                        len: 0,
                        written: 0,
                        live: 0,
                        live_bytes: 0,
                    },
                );
                st.dir_changes += 1;
                if let Some(previous) = st.active.insert((generation, lane), seq) {
                    // Closed for appends: if nothing in it is referenced any more, it goes now.
                    self.unlink_if_dead(&mut st, previous)?;
                }
                seq
            }
        };
        let f = st.files.get_mut(&seq).ok_or_else(|| StoreError::corrupt("batch files", "active file vanished"))?;
        let pos = f.len;
        f.len += n;
        f.live += 1;
        f.live_bytes += n;
        Ok((seq, pos, f.file.clone()))
    }

    /// Appends a stored batch value (see [`crate::batch`]) for `generation` and returns the
    /// reference to keep in sled. Its crc is not checked here: the caller made or checked the value.
    pub fn store(&self, generation: u64, what: &dyn Fn() -> String, value: &[u8]) -> Result<BatchRef, StoreError> {
        self.store_in(Lane::Apply, generation, what, value)
    }

    /// [`store`](Self::store) through `lane`'s active file.
    pub fn store_in(
        &self,
        lane: Lane,
        generation: u64,
        what: &dyn Fn() -> String,
        value: &[u8],
    ) -> Result<BatchRef, StoreError> {
        let header = batch::header(what, value)?;
        let (max_ts, count) = (header.max_timestamp_ms, header.count);
        let crc = checked::stored_crc(value).unwrap_or(0);
        let len = u32::try_from(value.len()).map_err(|_| StoreError::corrupt(what(), "batch above 4 GiB"))?;
        let (file, pos) = self.append(generation, lane, value)?;
        Ok(BatchRef { file, pos, len, crc, max_ts, count })
    }

    /// Reads the stored value `r` names and checks that its stored crc is the one the reference
    /// names (so a reference never hands out another batch's bytes). The crc over the bytes is
    /// checked once, by whoever opens the value ([`batch::decode`], [`checked::open`]).
    pub fn read(&self, what: &dyn Fn() -> String, r: &BatchRef) -> Result<Vec<u8>, StoreError> {
        let file = {
            let st = self.state.lock().map_err(lock_err)?;
            match st.files.get(&r.file) {
                Some(f) => f.file.clone(),
                None => return Err(StoreError::corrupt(what(), format!("its file {:016x} is missing", r.file))),
            }
        };
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.pos).map_err(|e| {
            StoreError::corrupt(
                what(),
                format!("cannot read {} bytes at {} of file {:016x}: {e}", r.len, r.pos, r.file),
            )
        })?;
        if checked::stored_crc(&buf) != Some(r.crc) {
            return Err(StoreError::corrupt(
                what(),
                format!("file {:016x} at {} does not hold the batch its reference names", r.file, r.pos),
            ));
        }
        Ok(buf)
    }

    /// Never hands out `seq` or a lower number for a new file. A number is never reused: sled may
    /// still hold references (unreachable ones, of reclaimed batches whose deletion did not reach the
    /// disk) or a sync mark naming a file that was unlinked, and those must never come to mean a new
    /// file's bytes.
    pub fn reserve_numbers_through(&self, seq: u64) -> Result<(), StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        st.next_seq = st.next_seq.max(seq.saturating_add(1));
        Ok(())
    }

    /// Forgets every reference count (the store counts them afresh at open).
    pub fn reset_counts(&self) -> Result<(), StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        st.files.values_mut().for_each(|f| {
            f.live = 0;
            f.live_bytes = 0;
        });
        Ok(())
    }

    /// The length of file `seq`, if it exists (is open).
    pub fn file_len(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.state.lock().map_err(lock_err)?.files.get(&seq).map(|f| f.len))
    }

    /// Counts one more reference, to `r`'s batch, in a file that belongs to `generation`.
    pub fn retain(&self, r: &BatchRef, generation: u64) -> Result<(), StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        if let Some(f) = st.files.get_mut(&r.file) {
            f.live += 1;
            f.live_bytes += u64::from(r.len);
            f.generation.get_or_insert(generation);
        }
        Ok(())
    }

    /// Counts one reference fewer, to `r`'s batch; unlinks its file once nothing in it is referenced.
    /// The file being appended to goes too (the next append starts a new one), so deleting a topic
    /// frees its space at once rather than when the file would have filled. Unlinks at once: only
    /// for references no reader can have found (a copy never published); the store releases
    /// published ones with [`release_keeping_files`](Self::release_keeping_files).
    pub fn release(&self, r: &BatchRef) -> Result<(), StoreError> {
        let dead = self.release_keeping_files(std::iter::once(r))?;
        self.unlink_released(&dead)
    }

    /// Counts the references `refs` fewer, like [`release`](Self::release), but of the files left
    /// with none, only forgets them: no reader finds them from now on, and the caller unlinks the
    /// returned ones with [`unlink_released`](Self::unlink_released) once it let readers go on
    /// (readers holding one open still read it).
    pub fn release_keeping_files<'a>(&self, refs: impl Iterator<Item = &'a BatchRef>) -> Result<Vec<u64>, StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        let mut touched = BTreeSet::new();
        for r in refs {
            if let Some(f) = st.files.get_mut(&r.file) {
                f.live = f.live.saturating_sub(1);
                f.live_bytes = f.live_bytes.saturating_sub(u64::from(r.len));
                touched.insert(r.file);
            }
        }
        let mut dead = Vec::new();
        for seq in touched {
            if st.files.get(&seq).is_some_and(|f| f.live == 0) {
                st.active.retain(|_, a| *a != seq);
                st.files.remove(&seq);
                st.dirty.remove(&seq);
                dead.push(seq);
            }
        }
        Ok(dead)
    }

    /// Unlinks files [`release_keeping_files`](Self::release_keeping_files) forgot, without holding
    /// the lock readers take to find a file (unlinking a 64 MiB file can take milliseconds).
    pub fn unlink_released(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut result = Ok(());
        for seq in seqs {
            let path = self.path(*seq);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    result = Err(StoreError::io(format!("remove {}", path.display()), e));
                    break;
                }
            }
        }
        // The directory changed (or may have): the next sync fsyncs it.
        self.state.lock().map_err(lock_err)?.dir_changes += 1;
        result
    }

    fn unlink_if_dead(&self, st: &mut State, seq: u64) -> Result<(), StoreError> {
        let dead = st.files.get(&seq).is_some_and(|f| f.live == 0);
        if dead && !st.active.values().any(|a| *a == seq) {
            st.files.remove(&seq);
            st.dirty.remove(&seq);
            self.unlink(st, seq)?;
        }
        Ok(())
    }

    fn unlink(&self, st: &mut State, seq: u64) -> Result<(), StoreError> {
        let path = self.path(seq);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("remove {}", path.display()), e)),
        }
        st.dir_changes += 1;
        Ok(())
    }

    /// Unlinks every file that no reference was counted for (run once at open, after counting) and
    /// every file of a generation other than `current`.
    pub fn drop_unreferenced(&self, current: u64) -> Result<usize, StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        let dead: Vec<u64> = st
            .files
            .iter()
            .filter(|(_, f)| f.live == 0 || f.generation.is_some_and(|g| g != current))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &dead {
            st.files.remove(seq);
            st.dirty.remove(seq);
            st.active.retain(|_, a| a != seq);
            self.unlink(&mut st, *seq)?;
        }
        Ok(dead.len())
    }

    /// Unlinks every file of `generation` (replaced by a snapshot install, or a failed one).
    pub fn drop_generation(&self, generation: u64) -> Result<(), StoreError> {
        let gone = self.forget_generation(generation)?;
        self.unlink_released(&gone)
    }

    /// Forgets every file of `generation` (no reader finds them from now on) and returns them, for
    /// [`unlink_released`](Self::unlink_released) once readers may go on.
    pub fn forget_generation(&self, generation: u64) -> Result<Vec<u64>, StoreError> {
        let mut st = self.state.lock().map_err(lock_err)?;
        let gone: Vec<u64> =
            st.files.iter().filter(|(_, f)| f.generation == Some(generation)).map(|(seq, _)| *seq).collect();
        st.active.retain(|(g, _), _| *g != generation);
        for seq in &gone {
            st.files.remove(seq);
            st.dirty.remove(seq);
        }
        Ok(gone)
    }

    /// Makes every byte whose append has completed durable (fdatasync of each file written since the
    /// last sync, fsync of the directory if files came or went). Returns each file's length as
    /// synced: up to its last completed append, not an append still writing. Callers on several
    /// threads may sync at once: a file stays unsynced until an fdatasync of it has finished, so
    /// each call fdatasyncs whatever it finds not yet covered, and never claims another's.
    pub fn sync(&self) -> Result<BTreeMap<u64, u64>, StoreError> {
        let (files, dir_changes, lengths) = {
            let st = self.state.lock().map_err(lock_err)?;
            if let Some(reason) = &st.poisoned {
                return Err(StoreError::io("sync batch files", std::io::Error::other(reason.clone())));
            }
            let files: Vec<(u64, Arc<File>, u64)> = st
                .dirty
                .iter()
                .filter_map(|seq| st.files.get(seq).map(|f| (*seq, f.file.clone(), f.written)))
                .collect();
            // What has been written, not what was handed out: an append writing right now is
            // not covered by this sync.
            let lengths = st.files.iter().map(|(seq, f)| (*seq, f.written)).collect();
            let dir_changes = (st.dir_changes != st.dir_synced).then_some(st.dir_changes);
            (files, dir_changes, lengths)
        };
        let synced = files
            .iter()
            .try_for_each(|(seq, f, _)| {
                f.sync_data().map_err(|e| StoreError::io(format!("fdatasync {}", self.path(*seq).display()), e))
            })
            .and_then(|()| if dir_changes.is_some() { durable::fsync_path(&self.dir) } else { Ok(()) });
        let mut st = self.state.lock().map_err(lock_err)?;
        if let Err(e) = &synced {
            st.poisoned = Some(e.to_string());
        } else {
            for (seq, _, written) in &files {
                // Written to since it was looked at: the next sync covers that.
                if st.files.get(seq).is_none_or(|f| f.written == *written) {
                    st.dirty.remove(seq);
                }
            }
            if let Some(changes) = dir_changes {
                st.dir_synced = st.dir_synced.max(changes);
            }
        }
        synced.map(|()| lengths)
    }

    /// Bytes in batch files.
    pub fn size(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().map_err(lock_err)?.files.values().map(|f| f.len).sum())
    }

    /// Bytes in batch files that references name (the rest of [`size`](Self::size) is dead).
    pub fn live_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.state.lock().map_err(lock_err)?.files.values().map(|f| f.live_bytes).sum())
    }

    /// Test hook: counts `bytes` more as live in file `seq`, as a release that never came would
    /// leave it (a file compaction chooses but can never empty).
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) fn count_phantom_live(&self, seq: u64, bytes: u64) {
        let mut st = self.state.lock().unwrap();
        let f = st.files.get_mut(&seq).unwrap();
        f.live_bytes += bytes;
        f.live += 1;
    }

    /// Test hook: how many files were written since the last sync.
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) fn unsynced_files(&self) -> usize {
        self.state.lock().unwrap().dirty.len()
    }

    /// Number of batch files.
    pub fn count(&self) -> Result<usize, StoreError> {
        Ok(self.state.lock().map_err(lock_err)?.files.len())
    }

    /// How `generation`'s files are used, at one moment: the files closed for appends (the only ones
    /// compaction may empty) with how much of each is still referenced, emptiest first; and the bytes
    /// of all its files, active ones too, and how many of those are referenced.
    pub fn usage(&self, generation: u64) -> Result<GenerationUse, StoreError> {
        let st = self.state.lock().map_err(lock_err)?;
        let mut usage = GenerationUse::default();
        for (seq, f) in st.files.iter().filter(|(_, f)| f.generation == Some(generation)) {
            usage.held += f.len;
            usage.live += f.live_bytes;
            if f.len > 0 && !st.active.values().any(|a| a == seq) {
                usage.closed.push(FileUse { seq: *seq, len: f.len, live_bytes: f.live_bytes });
            }
        }
        usage.closed.sort_by_key(|f| (u128::from(f.live_bytes) << 64) / u128::from(f.len.max(1)));
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Space handed out to an append that has not written yet is not claimed by a sync: after a
    /// power loss, a reference into it must be checked at open, not trusted.
    #[test]
    fn a_sync_claims_only_what_appends_have_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), FILE_BYTES).unwrap();
        let (seq, pos) = files.append(0, Lane::Apply, &[7u8; 100]).unwrap();
        assert_eq!((seq, pos), (0, 0));
        assert_eq!(files.sync().unwrap().get(&seq), Some(&100));
        // An append between its reservation and its write, as another thread's sync sees it.
        let (seq2, pos2, file) = files.reserve(0, Lane::Apply, 50).unwrap();
        assert_eq!((seq2, pos2), (seq, 100));
        assert_eq!(files.sync().unwrap().get(&seq), Some(&100), "claimed bytes not yet written");
        file.write_all_at(&[8u8; 50], pos2).unwrap();
        // (What `append` does after its write.)
        {
            let mut st = files.state.lock().unwrap();
            let f = st.files.get_mut(&seq).unwrap();
            assert_eq!(f.written, pos2);
            f.written = pos2 + 50;
            st.dirty.insert(seq);
        }
        assert_eq!(files.sync().unwrap().get(&seq), Some(&150));
        // The next append goes after the reserved space.
        assert_eq!(files.append(0, Lane::Apply, &[9u8; 10]).unwrap(), (seq, 150));
        assert_eq!(files.sync().unwrap().get(&seq), Some(&160));
    }
}
