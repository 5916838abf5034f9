//! The synced mark: a durable lower bound on where the log's fdatasynced entries end, kept outside
//! the segments so that recovery can tell a log that *lost* synced entries from one that merely
//! has a torn tail.
//!
//! Why: a segment cut at a frame boundary (a disk or filesystem fault, an operator's mistake) looks
//! exactly like a log whose last appends never completed, and recovery would start the node on the
//! shorter log. Those entries were acknowledged: the node would be an amnesiac voter, which breaks
//! Raft's safety as soon as a second fault joins in (docs/jepsen.md, finding 3). With the mark,
//! recovery refuses a log that ends below it, as it refuses any other damage.
//!
//! How: a background thread of the log writes the end of what it has synced (last index + 1) here every
//! `WalOptions::synced_mark_every`, off the acknowledgement path, so the mark trails the log by at
//! most that long; a cut within that window is not detected. `truncate` lowers the mark, durably,
//! before it cuts anything, so the mark never claims an entry Raft itself removed.
//!
//! File `synced`: two slots of `[crc32 u32 LE][seq u64 LE][end u64 LE]`, at bytes 0 and 4096 (each
//! in its own block), written in place in turn and fdatasynced. The slot with the higher sequence
//! number wins; a torn write leaves the other slot, an older and lower mark, which is still true.
//! A lowered mark is written to both slots, so no slot ever holds more than the log may keep.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::PoisonError;
use std::time::Duration;

use super::{format, lock, Shared, WalError};

pub(super) const SYNCED_MARK_FILE: &str = "synced";
const SLOT_STRIDE: usize = 4096;
const SLOT_BYTES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    seq: u64,
    /// Every index below this was fdatasynced.
    end: u64,
}

fn encode(slot: Slot) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[4..12].copy_from_slice(&slot.seq.to_le_bytes());
    b[12..20].copy_from_slice(&slot.end.to_le_bytes());
    let crc = crc32fast::hash(&b[4..]);
    b[0..4].copy_from_slice(&crc.to_le_bytes());
    b
}

enum Decoded {
    /// Never written (zeros, or past the end of the file).
    Empty,
    Valid(Slot),
    /// Bytes that are not a slot: a torn write, or damage.
    Damaged,
}

fn decode(bytes: &[u8]) -> Decoded {
    let Some(b) = bytes.first_chunk::<SLOT_BYTES>() else {
        return if bytes.iter().all(|&x| x == 0) { Decoded::Empty } else { Decoded::Damaged };
    };
    if b.iter().all(|&x| x == 0) {
        return Decoded::Empty;
    }
    let (crc, rest) = b.split_at(4);
    let (seq, end) = rest.split_at(8);
    let le64 = |s: &[u8]| s.try_into().map(u64::from_le_bytes).unwrap_or(0);
    if crc.try_into().map(u32::from_le_bytes).ok() != Some(crc32fast::hash(rest)) {
        return Decoded::Damaged;
    }
    Decoded::Valid(Slot { seq: le64(seq), end: le64(end) })
}

pub(super) struct SyncedMark {
    dir: PathBuf,
    path: PathBuf,
    /// Opened on the first write if the file did not exist.
    file: Option<File>,
    seq: u64,
    /// What the file says now (0: nothing written yet).
    end: u64,
}

impl SyncedMark {
    /// Reads the mark in `dir`. Fails if the file exists but neither slot holds a valid mark while
    /// one holds something else: the mark was damaged, and the log cannot be checked against it.
    pub fn open(dir: &Path) -> Result<SyncedMark, WalError> {
        let path = dir.join(SYNCED_MARK_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(SyncedMark { dir: dir.to_path_buf(), path, file: None, seq: 0, end: 0 })
            }
            Err(e) => return Err(WalError::io("read", &path)(e)),
        };
        let slot = |i: usize| decode(bytes.get(i * SLOT_STRIDE..).unwrap_or(&[]));
        let (a, b) = (slot(0), slot(1));
        let best = match (&a, &b) {
            (Decoded::Valid(x), Decoded::Valid(y)) => Some(if x.seq >= y.seq { *x } else { *y }),
            (Decoded::Valid(x), _) | (_, Decoded::Valid(x)) => Some(*x),
            // Nothing, or the very first write torn: no mark to check against.
            (Decoded::Empty, _) | (_, Decoded::Empty) => None,
            (Decoded::Damaged, Decoded::Damaged) => {
                return Err(WalError::corrupt(
                    &path,
                    0,
                    "no valid slot: the synced mark is damaged, so the log cannot be checked for lost entries",
                ))
            }
        };
        if matches!(a, Decoded::Damaged) || matches!(b, Decoded::Damaged) {
            tracing::warn!(file = %path.display(), "wal: one slot of the synced mark is damaged (a torn write?); using the other");
        }
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(WalError::io("open", &path))?;
        Ok(SyncedMark {
            dir: dir.to_path_buf(),
            path,
            file: Some(file),
            seq: best.map_or(0, |s| s.seq),
            end: best.map_or(0, |s| s.end),
        })
    }

    /// Every index below this was fdatasynced (0: the mark says nothing).
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably records a lower `end` (for a truncate) in both slots, one after the other: whichever
    /// a later torn write or damage leaves, it never claims more than the log will keep.
    pub fn lower(&mut self, end: u64) -> Result<(), WalError> {
        self.write(end)?;
        self.write(end)
    }

    /// Durably records `end` in the next slot.
    pub fn write(&mut self, end: u64) -> Result<(), WalError> {
        let created = self.file.is_none();
        let file = match self.file.take() {
            Some(f) => f,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(WalError::io("create", &self.path))?,
        };
        let file = self.file.insert(file);
        let seq = self.seq.saturating_add(1);
        let at = (seq % 2) as usize * SLOT_STRIDE;
        file.write_all_at(&encode(Slot { seq, end }), at as u64).map_err(WalError::io("write", &self.path))?;
        file.sync_data().map_err(WalError::io("fdatasync", &self.path))?;
        if created {
            format::sync_dir(&self.dir)?;
        }
        self.seq = seq;
        self.end = end;
        Ok(())
    }
}

/// The mark writer thread: every `every`, records how far the syncer's rounds have synced, if that
/// moved. Stops when the log stops; a failed write poisons the log like a failed fdatasync.
pub(super) fn run(sh: &Shared, every: Duration) {
    loop {
        {
            let st = lock(&sh.state);
            let (st, _) =
                sh.wake_marker.wait_timeout_while(st, every, |st| !st.stopping).unwrap_or_else(PoisonError::into_inner);
            if st.stopping {
                return;
            }
        }
        if let Err(e) = sh.advance_mark() {
            sh.fail(e);
            return;
        }
    }
}

impl Shared {
    /// Writes the synced end to the mark if it moved. Takes `mark` before `state` (see `Shared::mark`).
    pub(super) fn advance_mark(&self) -> Result<(), WalError> {
        let mut mark = lock(&self.mark);
        let synced = {
            let st = lock(&self.state);
            if st.poisoned.is_some() {
                return Ok(());
            }
            st.synced_end
        };
        match synced {
            Some(end) if end != mark.end() => mark.write(end),
            _ => Ok(()),
        }
    }

    /// Lowers the mark to `end`, durably, if it is above: before a truncate cuts the log there.
    pub(super) fn lower_mark(&self, end: u64) -> Result<(), WalError> {
        let mut mark = lock(&self.mark);
        {
            let mut st = lock(&self.state);
            st.synced_end = st.synced_end.map(|e| e.min(end));
        }
        if mark.end() > end {
            mark.lower(end)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 0);
        let mut m = SyncedMark::open(dir.path()).unwrap();
        m.write(10).unwrap();
        m.write(25).unwrap();
        m.write(30).unwrap();
        // Tear the newest write (seq 3, slot 1): the older slot, 25, is what remains.
        let path = dir.path().join(SYNCED_MARK_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[SLOT_STRIDE + 6] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 25);

        // Lowered (as for a truncate): both slots say so, whichever is damaged later.
        let mut m = SyncedMark::open(dir.path()).unwrap();
        m.lower(7).unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 7);
        for slot in [0, 1] {
            let mut bytes = fs::read(&path).unwrap();
            bytes[slot * SLOT_STRIDE + 6] ^= 0xff;
            fs::write(&path, &bytes).unwrap();
            assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 7, "slot {slot} damaged");
            bytes[slot * SLOT_STRIDE + 6] ^= 0xff;
            fs::write(&path, &bytes).unwrap();
        }

        // Both damaged: refused.
        let mut bytes = fs::read(&path).unwrap();
        bytes[6] ^= 0xff;
        bytes[SLOT_STRIDE + 6] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(SyncedMark::open(dir.path()), Err(WalError::Corrupt { .. })));
        // The very first write torn (one slot damaged, the other never written): no mark.
        let mut first = vec![0u8; SLOT_STRIDE + SLOT_BYTES];
        first[SLOT_STRIDE..].copy_from_slice(&[0xab; SLOT_BYTES]);
        fs::write(&path, &first).unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 0);
        // Cut to nothing: no mark (nothing to check against), not an error.
        fs::write(&path, b"").unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().end(), 0);
    }
}
