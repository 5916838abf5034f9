//! The snapshot file format: a stream of crc-framed frames, written and read sequentially so a
//! snapshot is never held whole in memory, whatever its size.
//!
//! ```text
//! file   := MAGIC frame*            (first frame Header, last frame End)
//! frame  := [crc32 u32 LE][len u32 LE][kind u8][body: len bytes]   crc over len, kind and body
//! Header := bincode(SnapshotHeader)       topics, partition offsets, the applied Raft position
//! Batch  := [topic u32 BE][partition u32 BE][base offset u64 BE][stored batch value]
//! End    := [batch count u64 LE]          proves the stream was not cut short
//! ```

use std::io::{self, Read, Write};

use crate::StoreError;

pub const MAGIC: &[u8; 8] = b"BBSNAP01";
/// No legitimate frame is larger (a batch is bounded by the produce size limit, far below this);
/// a larger length is corruption and must not make us allocate it.
pub const MAX_FRAME: u32 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Header = 1,
    Batch = 2,
    End = 3,
}

pub struct FrameWriter<W: Write> {
    w: W,
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(mut w: W) -> io::Result<Self> {
        w.write_all(MAGIC)?;
        Ok(Self { w, bytes: MAGIC.len() as u64 })
    }

    pub fn frame(&mut self, kind: FrameKind, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).ok().filter(|l| *l <= MAX_FRAME).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("snapshot frame of {len} bytes exceeds {MAX_FRAME}"))
        })?;
        let mut h = crc32fast::Hasher::new();
        h.update(&len.to_le_bytes());
        h.update(&[kind as u8]);
        for p in parts {
            h.update(p);
        }
        self.w.write_all(&h.finalize().to_le_bytes())?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(&[kind as u8])?;
        for p in parts {
            self.w.write_all(p)?;
        }
        self.bytes += 9 + u64::from(len);
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.w
    }
}

pub struct FrameReader<R: Read> {
    r: R,
    what: String,
    pos: u64,
}

impl<R: Read> FrameReader<R> {
    /// `what` names the source (a file path) in errors.
    pub fn new(mut r: R, what: impl Into<String>) -> Result<Self, StoreError> {
        let what = what.into();
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|e| StoreError::io(format!("read snapshot {what}"), e))?;
        if &magic != MAGIC {
            return Err(StoreError::corrupt(format!("snapshot {what}"), "bad magic: not a Busbar snapshot"));
        }
        Ok(Self { r, what, pos: 8 })
    }

    /// The next frame; a clean end of input before the End frame is reported by the caller.
    pub fn next_frame(&mut self) -> Result<Option<(FrameKind, Vec<u8>)>, StoreError> {
        let mut head = [0u8; 9];
        match read_full(&mut self.r, &mut head) {
            Ok(0) => return Ok(None),
            Ok(9) => {}
            Ok(n) => return Err(self.bad(format!("truncated frame header ({n} of 9 bytes)"))),
            Err(e) => return Err(StoreError::io(format!("read snapshot {}", self.what), e)),
        }
        let crc = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_FRAME {
            return Err(self.bad(format!("frame length {len} exceeds {MAX_FRAME}")));
        }
        let kind = match head[8] {
            1 => FrameKind::Header,
            2 => FrameKind::Batch,
            3 => FrameKind::End,
            k => return Err(self.bad(format!("unknown frame kind {k}"))),
        };
        let mut body = vec![0u8; len as usize];
        match read_full(&mut self.r, &mut body) {
            Ok(n) if n == body.len() => {}
            Ok(n) => return Err(self.bad(format!("truncated frame body ({n} of {len} bytes)"))),
            Err(e) => return Err(StoreError::io(format!("read snapshot {}", self.what), e)),
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&head[4..9]);
        h.update(&body);
        if h.finalize() != crc {
            return Err(self.bad("crc32 mismatch".into()));
        }
        self.pos += 9 + u64::from(len);
        Ok(Some((kind, body)))
    }

    pub fn bad(&self, reason: String) -> StoreError {
        StoreError::corrupt(format!("snapshot {} at byte {}", self.what, self.pos), reason)
    }
}

/// Like read_exact, but tells how much it got before end of input.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
