//! Opening a log directory: read the meta files, scan every segment, cut a torn tail, refuse corruption.
//!
//! The one kind of damage that recovery repairs is a torn tail of the LAST segment: a crash (of the process
//! or the machine) in the middle of an append that was never acknowledged, because acknowledgements wait for
//! fdatasync. Any other damage may sit under acknowledged entries, so it is reported and the node must not
//! start (serving or voting from a log that silently lost entries breaks Raft's safety).
//!
//! Why a torn tail can only be in the last segment: `append` fdatasyncs a segment before it creates the next
//! one, so every segment but the last was fully on disk before anything was written after it.
//!
//! Nothing is cut or deleted until every check has passed: a torn tail, segments hidden by the purge
//! point, empty segments. If the log lost synced entries or has a gap, opening refuses and leaves
//! every file and byte where it was: the evidence needed to tell a torn write from lost writes.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::format::{self, frame_crc, parse_header, FRAME_HEADER, MAX_ENTRY_BYTES, PURGED_FILE, TMP_SUFFIX, VOTE_FILE};
use super::synced_mark::SyncedMark;
use super::{Pos, Segment, WalError};

pub(super) struct Recovered {
    pub segments: VecDeque<Segment>,
    pub index: VecDeque<Pos>,
    /// Index of `index[0]`; meaningless while `index` is empty.
    pub first: u64,
    pub purged: Option<(u64, Bytes)>,
    pub vote: Option<Bytes>,
    pub mark: SyncedMark,
}

pub(super) fn recover(dir: &Path) -> Result<Recovered, WalError> {
    let existed = dir.exists();
    fs::create_dir_all(dir).map_err(WalError::io("create directory", dir))?;
    if !existed {
        // The directory entry itself must be durable, or a vote saved into it could vanish with it.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            format::sync_dir(parent)?;
        }
    }

    let mut bases: Vec<(u64, PathBuf)> = Vec::new();
    let mut removed_any = false;
    // Files to delete once every check has passed (see the module documentation).
    let mut to_remove: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(dir).map_err(WalError::io("list", dir))? {
        let entry = entry.map_err(WalError::io("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = format::parse_segment_name(name) {
            bases.push((base, entry.path()));
        } else if name.ends_with(TMP_SUFFIX) {
            // A meta file replacement that crashed before its rename: the old file is still in place.
            remove(&entry.path())?;
            removed_any = true;
        }
    }
    bases.sort_unstable_by_key(|(b, _)| *b);

    let vote = format::read_meta(&dir.join(VOTE_FILE))?;
    let purged_path = dir.join(PURGED_FILE);
    let purged = format::read_meta(&purged_path)?.map(|p| format::decode_purged(&purged_path, p)).transpose()?;
    let purged_index = purged.as_ref().map(|(i, _)| *i);

    // Segments wholly at or below the purge point, judged by the next segment's name. `purge` unlinks them
    // oldest first, but without an fsync of the directory after each unlink a crash can leave any subset;
    // dropping them by name first keeps such a subset from looking like a gap in the log.
    if let Some(p) = purged_index {
        while bases.len() >= 2 && bases[1].0 <= p.saturating_add(1) {
            let (_, path) = bases.remove(0);
            to_remove.push(path);
        }
    }

    let mut segments = VecDeque::new();
    let mut index = VecDeque::new();
    let mut first = None;
    let mut expected: Option<u64> = None;
    let mut torn_tail = None;
    let count = bases.len();
    for (i, (base, path)) in bases.into_iter().enumerate() {
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(WalError::io("open", &path))?;
        let scan = Scan { path: &path, base, is_last: i + 1 == count, purged: purged_index };
        let found = scan.run(&file, &mut expected, &mut index, &mut first)?;
        let all_purged = match (found.last_index, purged_index) {
            (None, _) => true,
            (Some(last), Some(p)) => last <= p,
            (Some(_), None) => false,
        };
        let file = Arc::new(file);
        if let Some(reason) = found.torn {
            let keep = found.end;
            torn_tail = Some(TornTail { path: path.clone(), file: file.clone(), keep, reason, remove: all_purged });
        }
        if all_purged {
            // Empty (never written, or torn to nothing) or hidden entirely by the purge point. Deleting it
            // also keeps the invariant that a segment's name is the index of its first frame. A torn one
            // is deleted with the cut; either only after the checks below.
            if torn_tail.as_ref().is_none_or(|t| t.path != path) {
                drop(file);
                to_remove.push(path);
            }
            continue;
        }
        segments.push_back(Segment { base, path, file, len: found.end });
    }

    // A log that ends below the synced mark lost entries it had fdatasynced (and so acknowledged),
    // however cleanly it ends: a torn tail is only ever above the mark.
    let mark = SyncedMark::open(dir)?;
    let end = expected.unwrap_or(0).max(purged_index.map_or(0, |p| p.saturating_add(1)));
    if end < mark.end() {
        let (file, offset) = segments.back().map_or((mark.path().to_path_buf(), 0), |s| (s.path.clone(), s.len));
        return Err(WalError::corrupt(
            file,
            offset,
            format!(
                "the log ends before index {end}, but its synced mark ({}) says every entry before {} was \
                 fdatasynced: acknowledged entries are gone (a segment was cut or lost); replace this node \
                 (docs/operations.md, \"Replacing a dead node\")",
                mark.path().display(),
                mark.end()
            ),
        ));
    }

    if let (Some(p), Some(first), Some(seg)) = (purged_index, first, segments.front()) {
        if first != p.saturating_add(1) {
            return Err(WalError::corrupt(
                &seg.path,
                0,
                format!("log resumes at index {first} but the purge point is {p}: entries in between are missing"),
            ));
        }
    }

    // Every check passed: only now is a torn tail known to be an append that was never acknowledged.
    for path in &to_remove {
        remove(path)?;
        removed_any = true;
    }
    if let Some(torn) = torn_tail {
        removed_any |= torn.remove;
        torn.cut()?;
    }
    if removed_any {
        format::sync_dir(dir)?;
    }

    Ok(Recovered { segments, index, first: first.unwrap_or(0), purged, vote, mark })
}

fn remove(path: &Path) -> Result<(), WalError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::io("remove", path)(e)),
    }
}

struct Scan<'a> {
    path: &'a Path,
    base: u64,
    is_last: bool,
    purged: Option<u64>,
}

struct Found {
    /// Byte length of the valid frames (the file is cut to it if its tail was torn).
    end: u64,
    last_index: Option<u64>,
    /// Why the bytes after `end` are a torn tail, if there are any: recovery cuts them once the synced
    /// mark has been checked.
    torn: Option<String>,
}

/// The torn tail of the last segment, cut only after the synced mark has been checked.
struct TornTail {
    path: PathBuf,
    file: Arc<File>,
    /// Length of the whole frames that stay.
    keep: u64,
    reason: String,
    /// No live frame stays: the segment is removed rather than cut.
    remove: bool,
}

impl TornTail {
    fn cut(self) -> Result<(), WalError> {
        let file_len = self.file.metadata().map_err(WalError::io("stat", &self.path))?.len();
        tracing::warn!(
            file = %self.path.display(),
            offset = self.keep,
            dropped_bytes = file_len.saturating_sub(self.keep),
            reason = %self.reason,
            "wal: cutting the torn tail of the last segment (an append that was never acknowledged)"
        );
        if self.remove {
            drop(self.file);
            return remove(&self.path);
        }
        self.file.set_len(self.keep).map_err(WalError::io("truncate", &self.path))?;
        self.file.sync_data().map_err(WalError::io("fsync", &self.path))
    }
}

/// A frame that cannot be used. Whether that is a torn tail or corruption depends on where it is.
enum Bad {
    /// The frame runs past the end of the file.
    Incomplete,
    /// The frame's bytes are wrong (checksum, length); `reason` says how.
    Invalid(String),
}

impl Scan<'_> {
    fn run(
        &self,
        file: &File,
        expected: &mut Option<u64>,
        index: &mut VecDeque<Pos>,
        first: &mut Option<u64>,
    ) -> Result<Found, WalError> {
        let io_err = |op| WalError::io(op, self.path);
        let file_len = file.metadata().map_err(io_err("stat"))?.len();
        // Reads stream through a bounded buffer: memory stays at one entry, whatever the segment size.
        let mut rd = BufReader::with_capacity(1 << 20, file);
        let mut payload = Vec::new();
        let mut off = 0u64;
        let mut last_index = None;
        loop {
            if off == file_len {
                return Ok(Found { end: off, last_index, torn: None });
            }
            let remaining = file_len - off;
            let want = expected.unwrap_or(self.base);
            if remaining < FRAME_HEADER as u64 {
                return self.bad(file, &mut rd, off, want, Bad::Incomplete).map(|torn| Found {
                    end: off,
                    last_index,
                    torn: Some(torn),
                });
            }
            let mut head = [0u8; FRAME_HEADER];
            rd.read_exact(&mut head).map_err(io_err("read"))?;
            let h = parse_header(&head);
            let len = h.len as usize;
            if len > MAX_ENTRY_BYTES {
                let bad = Bad::Invalid(format!("frame length {len} above the limit of {MAX_ENTRY_BYTES}"));
                return self.bad(file, &mut rd, off, want, bad).map(|torn| Found {
                    end: off,
                    last_index,
                    torn: Some(torn),
                });
            }
            if remaining - (FRAME_HEADER as u64) < len as u64 {
                return self.bad(file, &mut rd, off, want, Bad::Incomplete).map(|torn| Found {
                    end: off,
                    last_index,
                    torn: Some(torn),
                });
            }
            payload.resize(len, 0);
            rd.read_exact(&mut payload).map_err(io_err("read"))?;
            let actual = frame_crc(&head, &payload);
            if actual != h.crc {
                let bad = Bad::Invalid(format!("crc32 mismatch: stored {:#010x}, computed {actual:#010x}", h.crc));
                return self.bad(file, &mut rd, off, want, bad).map(|torn| Found {
                    end: off,
                    last_index,
                    torn: Some(torn),
                });
            }

            // A frame with a good checksum at the wrong index cannot come from a torn write: always fatal.
            if last_index.is_none() && h.index != self.base {
                return Err(WalError::corrupt(
                    self.path,
                    off,
                    format!("first frame holds index {} but the segment is named for {}", h.index, self.base),
                ));
            }
            if h.index != want {
                return Err(WalError::corrupt(
                    self.path,
                    off,
                    format!("frame holds index {}, expected {want}: the log is not contiguous", h.index),
                ));
            }
            let Some(next) = h.index.checked_add(1) else {
                return Err(WalError::corrupt(self.path, off, "index u64::MAX cannot be followed"));
            };
            if self.purged.is_none_or(|p| h.index > p) {
                first.get_or_insert(h.index);
                index.push_back(Pos { offset: off, len: h.len });
            }
            *expected = Some(next);
            last_index = Some(h.index);
            off += (FRAME_HEADER + len) as u64;
        }
    }

    /// Decides what a bad frame at `off` means: corruption (an error) or a torn tail (returns the reason,
    /// and the caller cuts the file at `off` later). `rd` is positioned just after the part of the frame
    /// that was read.
    fn bad(&self, file: &File, rd: &mut BufReader<&File>, off: u64, want: u64, bad: Bad) -> Result<String, WalError> {
        let torn = self.is_last
            && match &bad {
                // A frame that seems to run past the end is a torn append, unless its length field is
                // what was damaged: then whole frames of later indexes follow it, synced and perhaps
                // acknowledged, and cutting there would silently drop them.
                Bad::Incomplete => match later_frame(file, off, want).map_err(WalError::io("read", self.path))? {
                    None => true,
                    Some((at, index)) => {
                        return Err(WalError::corrupt(
                            self.path,
                            off,
                            format!(
                                "frame for index {want} claims to run past the end of the file, but a valid frame \
                                 for index {index} follows at byte {at}: its header is damaged"
                            ),
                        ))
                    }
                },
                // A frame torn by a power loss shows up as zeros where its pages never reached the disk.
                // Any non-zero byte after it means data was written after the bad frame, and that data may
                // be acknowledged: then the frame is damage inside the log, not its torn end.
                Bad::Invalid(_) => rest_is_zero(rd).map_err(WalError::io("read", self.path))?,
            };
        let reason = match bad {
            Bad::Incomplete => "frame runs past the end of the file".to_string(),
            Bad::Invalid(r) => r,
        };
        if !torn {
            let where_ = if self.is_last { "followed by non-zero data" } else { "in a segment that is not the last" };
            return Err(WalError::corrupt(self.path, off, format!("{reason}, {where_}")));
        }
        Ok(reason)
    }
}

/// Looks for a whole, valid frame of an index above `want` anywhere after `off` (at any byte offset:
/// after a damaged length field the frame boundaries are unknown). Only runs on the last segment's
/// bad tail, which is at most one segment long.
fn later_frame(file: &File, off: u64, want: u64) -> io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let rest = usize::try_from(len.saturating_sub(off)).unwrap_or(usize::MAX);
    let mut buf = vec![0u8; rest];
    file.read_exact_at(&mut buf, off)?;
    // At most one frame per header-size step can follow: a cheap upper bound on plausible indexes.
    let max_index = want.saturating_add((rest / FRAME_HEADER) as u64 + 1);
    for i in 1..buf.len().saturating_sub(FRAME_HEADER - 1) {
        let Some(head) = buf.get(i..i + FRAME_HEADER).and_then(|h| <&[u8; FRAME_HEADER]>::try_from(h).ok()) else {
            break;
        };
        let h = parse_header(head);
        if h.index <= want || h.index > max_index || h.len as usize > buf.len() - i - FRAME_HEADER {
            continue;
        }
        let payload = &buf[i + FRAME_HEADER..i + FRAME_HEADER + h.len as usize];
        if frame_crc(head, payload) == h.crc {
            return Ok(Some((off + i as u64, h.index)));
        }
    }
    Ok(None)
}

fn rest_is_zero(rd: &mut impl Read) -> io::Result<bool> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}
