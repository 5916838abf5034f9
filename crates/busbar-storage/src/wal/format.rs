//! The bytes on disk: segment frames, segment file names, and the small meta files (`vote`, `purged`).
//!
//! Frame: `[crc32 u32 LE][len u32 LE][index u64 LE][payload; len]`, the crc32 covering len, index and
//! payload. The index is inside the checksum so that a frame copied or left at the wrong place is caught,
//! not served as another entry. Meta file: `[crc32 u32 LE][len u32 LE][payload; len]`, crc over len and
//! payload, replaced as a whole by rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::WalError;

pub const FRAME_HEADER: usize = 16;
const META_HEADER: usize = 8;

/// Largest payload of one entry. A bound, so that a corrupt length can never make recovery or a read
/// allocate gigabytes, and so that one entry always fits a u32 length.
pub const MAX_ENTRY_BYTES: usize = 64 << 20;

pub(super) const SEGMENT_SUFFIX: &str = ".seg";
pub(super) const VOTE_FILE: &str = "vote";
pub(super) const PURGED_FILE: &str = "purged";
pub(super) const TMP_SUFFIX: &str = ".tmp";

/// Zero-padded so that the lexical order of names is the numeric order of first indexes.
pub(super) fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SEGMENT_SUFFIX}")
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends one frame to `buf`. The caller has checked `payload.len() <= MAX_ENTRY_BYTES`.
pub(super) fn encode_frame(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let start = buf.len();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

#[derive(Debug, Clone, Copy)]
pub(super) struct FrameHeader {
    pub crc: u32,
    pub len: u32,
    pub index: u64,
}

pub(super) fn parse_header(h: &[u8; FRAME_HEADER]) -> FrameHeader {
    let mut crc = [0; 4];
    let mut len = [0; 4];
    let mut index = [0; 8];
    crc.copy_from_slice(&h[0..4]);
    len.copy_from_slice(&h[4..8]);
    index.copy_from_slice(&h[8..16]);
    FrameHeader { crc: u32::from_le_bytes(crc), len: u32::from_le_bytes(len), index: u64::from_le_bytes(index) }
}

pub(super) fn frame_crc(header: &[u8; FRAME_HEADER], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[4..]);
    h.update(payload);
    h.finalize()
}

/// Checks the frame at the start of `buf` (which holds at least its header) against what the index says
/// is there, and returns the frame's payload length. Every read goes through here: a frame is never
/// served unverified.
pub(super) fn check_frame(buf: &[u8], want_index: u64, file: &Path, offset: u64) -> Result<usize, WalError> {
    let Some(head) = buf.first_chunk::<FRAME_HEADER>() else {
        return Err(WalError::corrupt(file, offset, "frame header cut short"));
    };
    let h = parse_header(head);
    let len = h.len as usize;
    if h.index != want_index {
        return Err(WalError::corrupt(file, offset, format!("frame holds index {}, expected {want_index}", h.index)));
    }
    let Some(payload) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Err(WalError::corrupt(file, offset, format!("frame length {len} runs past the indexed extent")));
    };
    let actual = frame_crc(head, payload);
    if actual != h.crc {
        return Err(WalError::corrupt(
            file,
            offset,
            format!("crc32 mismatch in entry {want_index}: stored {:#010x}, computed {actual:#010x}", h.crc),
        ));
    }
    Ok(len)
}

/// Reads a meta file; a missing file means "never written".
pub(super) fn read_meta(path: &Path) -> Result<Option<Bytes>, WalError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WalError::io("read", path)(e)),
    };
    let Some((head, payload)) = data.split_first_chunk::<META_HEADER>() else {
        return Err(WalError::corrupt(path, 0, format!("{} bytes is shorter than the header", data.len())));
    };
    let mut crc = [0; 4];
    let mut len = [0; 4];
    crc.copy_from_slice(&head[0..4]);
    len.copy_from_slice(&head[4..8]);
    let (crc, len) = (u32::from_le_bytes(crc), u32::from_le_bytes(len) as usize);
    if len != payload.len() {
        return Err(WalError::corrupt(path, 4, format!("length field says {len} bytes, file holds {}", payload.len())));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[4..8]);
    h.update(payload);
    let actual = h.finalize();
    if actual != crc {
        return Err(WalError::corrupt(path, 0, format!("crc32 mismatch: stored {crc:#010x}, computed {actual:#010x}")));
    }
    Ok(Some(Bytes::copy_from_slice(payload)))
}

/// Replaces `dir/name` so that after a crash it holds either the old or the new payload, whole, and the
/// new one once this returns: write a temporary file, fsync it, rename it over, fsync the directory (the
/// rename itself is only durable once the directory is).
pub(super) fn write_meta(dir: &Path, name: &str, payload: &[u8]) -> Result<(), WalError> {
    let len = u32::try_from(payload.len()).map_err(|_| WalError::EntryTooLarge {
        index: 0,
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(META_HEADER + payload.len());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[4..]);
    buf[0..4].copy_from_slice(&crc.to_le_bytes());

    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(WalError::io("create", &tmp))?;
    f.write_all(&buf).map_err(WalError::io("write", &tmp))?;
    f.sync_all().map_err(WalError::io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(WalError::io("rename", &tmp))?;
    sync_dir(dir)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(WalError::io("fsync directory", dir))
}

/// The `purged` file's payload: `[index u64 LE][meta]`.
pub(super) fn encode_purged(index: u64, meta: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + meta.len());
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(meta);
    v
}

pub(super) fn decode_purged(path: &Path, payload: Bytes) -> Result<(u64, Bytes), WalError> {
    let Some(head) = payload.first_chunk::<8>() else {
        return Err(WalError::corrupt(path, META_HEADER as u64, "purge point shorter than its index"));
    };
    let index = u64::from_le_bytes(*head);
    Ok((index, payload.slice(8..)))
}

pub(super) fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(segment_name(first_index))
}
