//! A batch of records in its stored encoding, carried as one buffer from the produce request to
//! the state machine.
//!
//! The leader encodes a produced batch once. From then on the batch is bytes: the Raft log, the
//! replication messages to the followers, the followers' logs and the stored value in the state
//! machine all copy the buffer, none of them decodes and re-encodes each record (which cost one
//! allocation per record value per hop, most of the leader's CPU under batched load). Records are
//! decoded only when read.
//!
//! Layout (little endian):
//!
//! ```text
//! [max_timestamp_ms: i64][count: u32][encoding: u32][record 0][record 1]...[record count-1]
//! ```
//!
//! The records are in one of two [`RecordEncoding`]s, named by the header:
//! - **`Bincode` (0)**: bincode 1's default encoding of [`Record`], fixed-width lengths, 25 bytes
//!   per record besides its key, value and headers. With the encoding word 0 the header reads as
//!   bincode's `u64` length, so the batch is bincode's own encoding of `(i64, Vec<Record>)`. Every
//!   batch written before apply version 4 is in it, and a build before version 4 reads only it
//!   (it refuses any other as a count above `u32::MAX`).
//! - **`Varint` (1)**: per record a flags byte, the timestamp as a zigzag varint, lengths as
//!   varints (LEB128): 8 bytes for an unkeyed record without headers at today's timestamps. The
//!   leader encodes in it once the cluster applies at version 4 (`busbar_storage::apply_version`).
//!
//! Each record's encoding stands alone (nothing is relative to the header or to the record
//! before), so the batches of several produce commands in one encoding merge into one by writing a
//! new header before their record bytes ([`merge`]), and a prefix of a batch's records encodes to
//! a prefix of its record bytes. Both encodings are canonical (one encoding per record: the varint
//! decoder refuses overlong varints), so decoding then encoding gives back the same bytes, which
//! the snapshot export's cut of a batch relies on.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::record::{Header, Record};

/// Bytes before the first record: the newest timestamp, the record count and the encoding.
pub const HEADER_BYTES: usize = 16;

/// How a batch's records are encoded (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordEncoding {
    /// bincode 1, fixed-width lengths: what every build reads.
    Bincode,
    /// Flags, zigzag timestamp and varint lengths: what builds from apply version 4 on read.
    Varint,
}

impl RecordEncoding {
    fn tag(self) -> u32 {
        match self {
            Self::Bincode => 0,
            Self::Varint => 1,
        }
    }

    fn from_tag(tag: u32) -> Result<Self, RecordBatchError> {
        match tag {
            0 => Ok(Self::Bincode),
            1 => Ok(Self::Varint),
            other => Err(RecordBatchError::UnknownEncoding(other)),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordBatchError {
    #[error("a record batch of {0} bytes is shorter than its {HEADER_BYTES}-byte header")]
    Short(usize),
    #[error("a record batch names record encoding {0}; this build knows 0 (bincode) and 1 (varint)")]
    UnknownEncoding(u32),
    #[error("record batches in different encodings cannot be merged by copying their bytes")]
    MixedEncodings,
    #[error("record batch: {0}")]
    Codec(String),
}

/// The header of an encoded batch: its newest timestamp, record count and encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub max_timestamp_ms: i64,
    pub count: u32,
    pub encoding: RecordEncoding,
}

impl BatchHeader {
    /// Reads (and checks) the header at the start of `bytes`.
    pub fn read(bytes: &[u8]) -> Result<Self, RecordBatchError> {
        let short = || RecordBatchError::Short(bytes.len());
        let word = |at: std::ops::Range<usize>| bytes.get(at).ok_or_else(short);
        let max_timestamp_ms = i64::from_le_bytes(word(0..8)?.try_into().map_err(|_| short())?);
        let count = u32::from_le_bytes(word(8..12)?.try_into().map_err(|_| short())?);
        let tag = u32::from_le_bytes(word(12..16)?.try_into().map_err(|_| short())?);
        Ok(Self { max_timestamp_ms, count, encoding: RecordEncoding::from_tag(tag)? })
    }

    fn write(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.max_timestamp_ms.to_le_bytes());
        buf.extend_from_slice(&self.count.to_le_bytes());
        buf.extend_from_slice(&self.encoding.tag().to_le_bytes());
    }
}

/// An encoded batch of records (see the [module documentation](self)). Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordBatch {
    bytes: Bytes,
    header: BatchHeader,
}

impl RecordBatch {
    /// Encodes `records` in `encoding`; the batch's newest timestamp is the largest of theirs (0
    /// when empty).
    pub fn encode(records: &[Record], encoding: RecordEncoding) -> Result<Self, RecordBatchError> {
        let count = u32::try_from(records.len())
            .map_err(|_| RecordBatchError::Codec(format!("{} records do not fit one batch", records.len())))?;
        let header = BatchHeader {
            max_timestamp_ms: records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0),
            count,
            encoding,
        };
        // Room for bincode's encoding, which is longer than varint's but for the largest lengths
        // and timestamps (the buffer grows then).
        let body: usize = records.iter().map(Record::encoded_len_hint).sum();
        let mut buf = Vec::with_capacity(HEADER_BYTES + body);
        header.write(&mut buf);
        for r in records {
            match encoding {
                RecordEncoding::Bincode => {
                    bincode::serialize_into(&mut buf, r).map_err(|e| RecordBatchError::Codec(e.to_string()))?
                }
                RecordEncoding::Varint => varint::encode(r, &mut buf),
            }
        }
        Ok(Self { bytes: Bytes::from(buf), header })
    }

    /// Takes an encoded batch, checking its header (not its records: those are checked when the
    /// batch is decoded).
    pub fn from_bytes(bytes: Bytes) -> Result<Self, RecordBatchError> {
        let header = BatchHeader::read(&bytes)?;
        Ok(Self { bytes, header })
    }

    pub fn count(&self) -> u32 {
        self.header.count
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// The newest record timestamp (retention by time drops whole batches by it).
    pub fn max_timestamp_ms(&self) -> i64 {
        self.header.max_timestamp_ms
    }

    pub fn encoding(&self) -> RecordEncoding {
        self.header.encoding
    }

    /// The whole encoding, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Encoded size, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The records' bytes, after the header.
    fn records_bytes(&self) -> &[u8] {
        self.bytes.get(HEADER_BYTES..).unwrap_or_default()
    }

    pub fn decode(&self) -> Result<Vec<Record>, RecordBatchError> {
        decode(&self.bytes)
    }
}

/// Decodes an encoded batch (a [`RecordBatch`]'s bytes, or [`merge`]'s output). A varint batch
/// must hold exactly the records its header counts; a bincode one is read as builds before the
/// varint encoding read it (bincode 1 ignores bytes after the last record).
pub fn decode(bytes: &[u8]) -> Result<Vec<Record>, RecordBatchError> {
    decode_in(bytes, None)
}

/// [`decode`], with the keys, values and header values of a varint batch as slices of `bytes`
/// (no allocation or copy per record; a bincode batch's are copies). Every record then keeps the
/// whole of `bytes` alive: for records on their way out (a read's response), not for keeping.
pub fn decode_shared(bytes: &Bytes) -> Result<Vec<Record>, RecordBatchError> {
    decode_in(bytes, Some(bytes))
}

fn decode_in(bytes: &[u8], owner: Option<&Bytes>) -> Result<Vec<Record>, RecordBatchError> {
    let header = BatchHeader::read(bytes)?;
    match header.encoding {
        RecordEncoding::Bincode => {
            let (_, records): (i64, Vec<Record>) =
                bincode::deserialize(bytes).map_err(|e| RecordBatchError::Codec(e.to_string()))?;
            Ok(records)
        }
        RecordEncoding::Varint => varint::decode(bytes.get(HEADER_BYTES..).unwrap_or_default(), header.count, owner),
    }
}

/// One batch holding the records of `parts`, in order: a new header, then each part's record
/// bytes. What a [`RecordBatch::encode`] of all their records would give. The parts must share an
/// encoding ([`RecordBatchError::MixedEncodings`] otherwise); none is an empty `Bincode` batch.
pub fn merge(parts: &[&RecordBatch]) -> Result<Vec<u8>, RecordBatchError> {
    let encoding = parts.first().map_or(RecordEncoding::Bincode, |p| p.encoding());
    if parts.iter().any(|p| p.encoding() != encoding) {
        return Err(RecordBatchError::MixedEncodings);
    }
    let count: u64 = parts.iter().map(|p| u64::from(p.count())).sum();
    let header = BatchHeader {
        max_timestamp_ms: parts.iter().map(|p| p.max_timestamp_ms()).max().unwrap_or(0),
        count: u32::try_from(count)
            .map_err(|_| RecordBatchError::Codec(format!("{count} records do not fit one batch")))?,
        encoding,
    };
    let mut buf = Vec::with_capacity(HEADER_BYTES + parts.iter().map(|p| p.records_bytes().len()).sum::<usize>());
    header.write(&mut buf);
    for p in parts {
        buf.extend_from_slice(p.records_bytes());
    }
    Ok(buf)
}

/// The `Varint` record encoding:
///
/// ```text
/// flags: u8                      bit 0: a key follows; bit 1: headers follow; the rest 0
/// timestamp_ms: zigzag varint
/// [key_len: varint][key]         if bit 0
/// value_len: varint, value
/// [header_count: varint, then per header name_len: varint, name (UTF-8), value_len: varint, value]   if bit 1
/// ```
///
/// Varints are LEB128 (7 bits a byte, low first), at most 10 bytes, and never longer than needed
/// (a last byte of 0 after others is refused), so every record has one encoding.
mod varint {
    use super::*;

    const HAS_KEY: u8 = 1;
    const HAS_HEADERS: u8 = 2;
    /// The smallest record: flags, a one-byte timestamp and a one-byte value length.
    const MIN_RECORD_BYTES: usize = 3;
    /// Records, and headers of one record, reserved for ahead of decoding them (about 1.5 MiB):
    /// a false count in a damaged batch must not make a large allocation.
    const MAX_RESERVED: usize = 16 << 10;

    #[cfg(test)]
    fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    fn zigzag(v: i64) -> u64 {
        ((v << 1) ^ (v >> 63)) as u64
    }

    fn unzigzag(u: u64) -> i64 {
        ((u >> 1) as i64) ^ -((u & 1) as i64)
    }

    fn put(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
        put(buf, b.len() as u64);
        buf.extend_from_slice(b);
    }

    /// The exact size of `r`'s encoding (tests check `encode` against it).
    #[cfg(test)]
    pub(super) fn encoded_len(r: &Record) -> usize {
        let with_len = |n: usize| varint_len(n as u64) + n;
        let headers = if r.headers.is_empty() {
            0
        } else {
            varint_len(r.headers.len() as u64)
                + r.headers.iter().map(|h| with_len(h.name.len()) + with_len(h.value.len())).sum::<usize>()
        };
        1 + varint_len(zigzag(r.timestamp_ms))
            + r.key.as_ref().map_or(0, |k| with_len(k.len()))
            + with_len(r.value.len())
            + headers
    }

    pub(super) fn encode(r: &Record, buf: &mut Vec<u8>) {
        let flags = if r.key.is_some() { HAS_KEY } else { 0 } | if r.headers.is_empty() { 0 } else { HAS_HEADERS };
        buf.push(flags);
        put(buf, zigzag(r.timestamp_ms));
        if let Some(k) = &r.key {
            put_bytes(buf, k);
        }
        put_bytes(buf, &r.value);
        if !r.headers.is_empty() {
            put(buf, r.headers.len() as u64);
            for h in &r.headers {
                put_bytes(buf, h.name.as_bytes());
                put_bytes(buf, &h.value);
            }
        }
    }

    struct Reader<'b> {
        bytes: &'b [u8],
        record: u32,
        /// The buffer `bytes` lies in, when keys and values may be slices of it rather than copies.
        owner: Option<&'b Bytes>,
    }

    impl<'b> Reader<'b> {
        fn bad(&self, what: &str) -> RecordBatchError {
            RecordBatchError::Codec(format!("record {}: {what}", self.record))
        }

        fn byte(&mut self) -> Result<u8, RecordBatchError> {
            let (&b, rest) = self.bytes.split_first().ok_or_else(|| self.bad("ends early"))?;
            self.bytes = rest;
            Ok(b)
        }

        fn varint(&mut self) -> Result<u64, RecordBatchError> {
            let mut v = 0u64;
            for i in 0..10 {
                let b = self.byte()?;
                if i == 9 && b > 1 {
                    break;
                }
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    if b == 0 && i > 0 {
                        return Err(self.bad("an overlong varint"));
                    }
                    return Ok(v);
                }
            }
            Err(self.bad("a varint longer than 64 bits"))
        }

        fn bytes(&mut self) -> Result<&'b [u8], RecordBatchError> {
            let n = self.varint()?;
            let n = usize::try_from(n).ok().filter(|&n| n <= self.bytes.len()).ok_or_else(|| {
                self.bad(&format!("a length of {n} bytes, past the {} the batch has left", self.bytes.len()))
            })?;
            let (b, rest) = self.bytes.split_at(n);
            self.bytes = rest;
            Ok(b)
        }

        /// A key's or value's bytes: a slice of the owner (no copy), else a copy.
        fn bytes_out(&mut self) -> Result<Bytes, RecordBatchError> {
            let b = self.bytes()?;
            Ok(match self.owner {
                // `b` was cut from `self.bytes`, which lies inside the owner: `slice_ref` holds.
                Some(owner) => owner.slice_ref(b),
                None => Bytes::copy_from_slice(b),
            })
        }

        fn record(&mut self) -> Result<Record, RecordBatchError> {
            let flags = self.byte()?;
            if flags & !(HAS_KEY | HAS_HEADERS) != 0 {
                return Err(self.bad(&format!("unknown flags {flags:#04x}")));
            }
            let timestamp_ms = unzigzag(self.varint()?);
            let key = if flags & HAS_KEY != 0 { Some(self.bytes_out()?) } else { None };
            let value = self.bytes_out()?;
            let mut headers = Vec::new();
            if flags & HAS_HEADERS != 0 {
                let n = self.varint()?;
                // Each header takes two bytes at least: no count can ask for more room than that.
                if n == 0 || n > (self.bytes.len() / 2) as u64 {
                    return Err(self.bad(&format!("{n} headers in {} bytes", self.bytes.len())));
                }
                headers.reserve((n as usize).min(MAX_RESERVED));
                for _ in 0..n {
                    let name = std::str::from_utf8(self.bytes()?).map_err(|_| self.bad("a header name not UTF-8"))?;
                    let name = name.to_owned();
                    headers.push(Header { name, value: self.bytes_out()? });
                }
            }
            Ok(Record { key, value, headers, timestamp_ms })
        }
    }

    /// The records of `bytes` (after the header). With an `owner` (the buffer `bytes` lies in),
    /// their keys and values are slices of it; without, copies.
    pub(super) fn decode(bytes: &[u8], count: u32, owner: Option<&Bytes>) -> Result<Vec<Record>, RecordBatchError> {
        let mut records = Vec::with_capacity((count as usize).min(bytes.len() / MIN_RECORD_BYTES).min(MAX_RESERVED));
        let mut r = Reader { bytes, record: 0, owner };
        while r.record < count {
            records.push(r.record()?);
            r.record += 1;
        }
        if !r.bytes.is_empty() {
            return Err(RecordBatchError::Codec(format!("{} bytes after the batch's {count} records", r.bytes.len())));
        }
        Ok(records)
    }

    #[cfg(test)]
    pub(super) fn round_trips_varints() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            put(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            let mut r = Reader { bytes: &buf, record: 0, owner: None };
            assert_eq!(r.varint().unwrap(), v);
            assert!(r.bytes.is_empty());
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, 1_800_000_000_000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        // Overlong: 0 as two bytes, 1 as three.
        assert!(Reader { bytes: &[0x80, 0x00], record: 0, owner: None }
            .varint()
            .unwrap_err()
            .to_string()
            .contains("overlong"));
        assert!(Reader { bytes: &[0x81, 0x80, 0x00], record: 0, owner: None }.varint().is_err());
        // Eleven bytes, or a tenth byte above 1: more than 64 bits.
        let mut r = Reader { bytes: &[0xff; 11], record: 0, owner: None };
        assert!(r.varint().is_err());
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert!(Reader { bytes: &too_big, record: 0, owner: None }.varint().is_err());
    }
}

impl std::fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordBatch({} records, {:?}, {} bytes)", self.count(), self.encoding(), self.bytes.len())
    }
}

/// On the wire and in the log: the encoding as one byte string (one copy, no per-record work).
impl Serialize for RecordBatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.bytes.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RecordBatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = Bytes::deserialize(d)?;
        Self::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [RecordEncoding; 2] = [RecordEncoding::Bincode, RecordEncoding::Varint];

    fn rec(i: i64) -> Record {
        Record {
            key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
            value: Bytes::from(vec![i as u8; i as usize * 3]),
            headers: if i % 3 == 0 {
                vec![
                    Header { name: "h".into(), value: Bytes::from_static(b"v") },
                    Header { name: "é".into(), value: Bytes::new() },
                ]
            } else {
                vec![]
            },
            timestamp_ms: if i == 7 { -5 } else { 1_000 + (i * 7) % 5 },
        }
    }

    #[test]
    fn round_trips_and_reports_its_header() {
        let mut records: Vec<Record> = (0..10).map(rec).collect();
        records.push(Record {
            key: Some(Bytes::new()),
            value: Bytes::from(vec![9; 300]),
            headers: vec![],
            timestamp_ms: i64::MIN,
        });
        records.push(Record { key: None, value: Bytes::new(), headers: vec![], timestamp_ms: i64::MAX });
        for encoding in BOTH {
            let b = RecordBatch::encode(&records, encoding).unwrap();
            assert_eq!(b.count(), 12);
            assert_eq!(b.encoding(), encoding);
            assert_eq!(b.max_timestamp_ms(), i64::MAX);
            assert_eq!(b.decode().unwrap(), records, "{encoding:?}");
            // Through serde (the log and the replication messages), unchanged.
            let wire = bincode::serialize(&b).unwrap();
            let back: RecordBatch = bincode::deserialize(&wire).unwrap();
            assert_eq!(back, b);
            assert_eq!(back.encoding(), encoding);
        }
    }

    #[test]
    fn a_bincode_batch_is_bincodes_own_encoding_of_its_records() {
        // What every build before the varint encoding wrote and reads.
        let records: Vec<Record> = (0..6).map(rec).collect();
        let b = RecordBatch::encode(&records, RecordEncoding::Bincode).unwrap();
        let max_ts = records.iter().map(|r| r.timestamp_ms).max().unwrap();
        assert_eq!(b.as_bytes(), bincode::serialize(&(max_ts, &records)).unwrap());
        // And a build that reads only bincode sees a varint batch's count word as more records than
        // a batch may hold, which it refuses.
        let v = RecordBatch::encode(&records, RecordEncoding::Varint).unwrap();
        let old_count = u64::from_le_bytes(v.as_bytes()[8..16].try_into().unwrap());
        assert!(old_count > u64::from(u32::MAX), "{old_count}");
    }

    #[test]
    fn a_small_record_costs_8_bytes_in_varint_and_25_in_bincode() {
        let now_ms = 1_796_000_000_000; // December 2026
        let one = [Record { key: None, value: Bytes::from(vec![1; 100]), headers: vec![], timestamp_ms: now_ms }];
        let size = |e| RecordBatch::encode(&one, e).unwrap().len() - HEADER_BYTES;
        assert_eq!(size(RecordEncoding::Bincode), 125);
        assert_eq!(size(RecordEncoding::Varint), 108);
        for r in (0..10).map(rec) {
            let mut buf = Vec::new();
            varint::encode(&r, &mut buf);
            assert_eq!(buf.len(), varint::encoded_len(&r), "{r:?}");
        }
    }

    #[test]
    fn merged_batches_equal_one_batch_of_all_their_records() {
        let records: Vec<Record> = (0..12).map(rec).collect();
        for encoding in BOTH {
            let parts: Vec<RecordBatch> =
                records.chunks(5).map(|c| RecordBatch::encode(c, encoding).unwrap()).collect();
            let merged = merge(&parts.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(merged, RecordBatch::encode(&records, encoding).unwrap().as_bytes());
            assert_eq!(decode(&merged).unwrap(), records);
        }
        let a = RecordBatch::encode(&records[..2], RecordEncoding::Bincode).unwrap();
        let b = RecordBatch::encode(&records[2..], RecordEncoding::Varint).unwrap();
        assert_eq!(merge(&[&a, &b]), Err(RecordBatchError::MixedEncodings));
    }

    #[test]
    fn a_bad_header_is_refused() {
        assert_eq!(RecordBatch::from_bytes(Bytes::from_static(b"short")), Err(RecordBatchError::Short(5)));
        let mut unknown = vec![0u8; 16];
        unknown[12..].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(RecordBatch::from_bytes(Bytes::from(unknown.clone())), Err(RecordBatchError::UnknownEncoding(7)));
        assert_eq!(decode(&unknown), Err(RecordBatchError::UnknownEncoding(7)));
        // A header whose records do not follow decodes to an error, not a panic.
        for encoding in BOTH {
            let mut lying = RecordBatch::encode(&[], encoding).unwrap().as_bytes().to_vec();
            lying[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            let b = RecordBatch::from_bytes(Bytes::from(lying)).unwrap();
            assert!(b.decode().is_err(), "{encoding:?}");
        }
        let wire = bincode::serialize(&Bytes::from_static(b"tiny")).unwrap();
        assert!(bincode::deserialize::<RecordBatch>(&wire).is_err());
    }

    #[test]
    fn shared_decoding_slices_varint_records_out_of_the_batch() {
        let mut records: Vec<Record> = (0..10).map(rec).collect();
        records.push(Record { key: Some(Bytes::new()), value: Bytes::new(), headers: vec![], timestamp_ms: 3 });
        for encoding in BOTH {
            let batch = RecordBatch::encode(&records, encoding).unwrap();
            let bytes = Bytes::copy_from_slice(batch.as_bytes());
            let shared = decode_shared(&bytes).unwrap();
            assert_eq!(shared, records, "{encoding:?}");
            let range = bytes.as_ptr_range();
            let inside = |b: &Bytes| b.is_empty() || range.contains(&b.as_ptr());
            let all_inside = shared.iter().all(|r| {
                inside(&r.value) && r.key.as_ref().is_none_or(inside) && r.headers.iter().all(|h| inside(&h.value))
            });
            // Varint: every key, value and header value lies in the batch's own bytes, no copy.
            // Bincode: copies (serde's `Bytes` reads into a new buffer), as before.
            assert_eq!(all_inside, encoding == RecordEncoding::Varint, "{encoding:?}");
            let copied = decode(&bytes).unwrap();
            assert!(copied.iter().all(|r| r.value.is_empty() || !range.contains(&r.value.as_ptr())));
        }
    }

    #[test]
    fn damaged_varint_records_decode_to_errors() {
        varint::round_trips_varints();
        let records: Vec<Record> = (0..10).map(rec).collect();
        let good = RecordBatch::encode(&records, RecordEncoding::Varint).unwrap().as_bytes().to_vec();
        // Cut anywhere in the records, or one byte too many: an error naming what is wrong.
        for cut in HEADER_BYTES..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).unwrap_err().to_string().contains("after the batch's 10 records"));
        // Every single-byte change either is refused or decodes to other records whose encoding is
        // exactly the changed bytes (one encoding per record); none panics.
        for at in HEADER_BYTES..good.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = v;
                // Decoding in place reads the same bytes the same way.
                assert_eq!(decode_shared(&Bytes::from(bad.clone())), decode(&bad), "byte {at} set to {v:#04x}");
                if let Ok(other) = decode(&bad) {
                    let again = RecordBatch::encode(&other, RecordEncoding::Varint).unwrap();
                    assert_eq!(&again.as_bytes()[HEADER_BYTES..], &bad[HEADER_BYTES..], "byte {at} set to {v:#04x}");
                }
            }
        }
        // Unknown flags; a header count of zero; a header name that is not UTF-8.
        let header = |n: u32| {
            let mut h = Vec::new();
            BatchHeader { max_timestamp_ms: 0, count: n, encoding: RecordEncoding::Varint }.write(&mut h);
            h
        };
        let with = |body: &[u8]| [header(1), body.to_vec()].concat();
        assert!(decode(&with(&[0x04, 0, 0])).unwrap_err().to_string().contains("unknown flags"));
        assert!(decode(&with(&[0x02, 0, 0, 0])).unwrap_err().to_string().contains("0 headers"));
        assert!(decode(&with(&[0x02, 0, 0, 1, 1, 0xff, 0])).unwrap_err().to_string().contains("UTF-8"));
        assert_eq!(
            decode(&with(&[0x00, 0, 0])).unwrap(),
            vec![Record { key: None, value: Bytes::new(), headers: vec![], timestamp_ms: 0 }]
        );
    }
}
