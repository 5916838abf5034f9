//! The crc32 envelope of every value Busbar stores in sled: `[crc32 of payload, u32 LE][payload]`.
//! A value whose checksum does not match is reported as corrupt and never served.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::StoreError;

/// Bytes the envelope adds before the payload.
pub const ENVELOPE_BYTES: usize = 4;

pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + ENVELOPE_BYTES);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The crc a sealed value says its payload has (its first four bytes), if it is long enough.
pub fn stored_crc(value: &[u8]) -> Option<u32> {
    value.first_chunk::<4>().map(|crc| u32::from_le_bytes(*crc))
}

/// Verifies and strips the envelope. `what` names the value in the error.
pub fn open<'a>(what: &dyn Fn() -> String, value: &'a [u8]) -> Result<&'a [u8], StoreError> {
    let Some((crc, payload)) = value.split_first_chunk::<4>() else {
        return Err(StoreError::corrupt(
            what(),
            format!("value of {} bytes is shorter than its checksum", value.len()),
        ));
    };
    let expected = u32::from_le_bytes(*crc);
    let actual = crc32fast::hash(payload);
    if expected != actual {
        return Err(StoreError::corrupt(
            what(),
            format!("crc32 mismatch: stored {expected:#010x}, computed {actual:#010x}"),
        ));
    }
    Ok(payload)
}

pub fn seal_bincode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    let payload = bincode::serialize(value).map_err(|e| StoreError::corrupt(what, format!("encode: {e}")))?;
    Ok(seal(&payload))
}

pub fn open_bincode<T: DeserializeOwned>(what: &dyn Fn() -> String, value: &[u8]) -> Result<T, StoreError> {
    let payload = open(what, value)?;
    bincode::deserialize(payload).map_err(|e| StoreError::corrupt(what(), format!("decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_any_flipped_bit() {
        let sealed = seal(b"hello busbar");
        assert_eq!(open(&|| "v".into(), &sealed).ok(), Some(&b"hello busbar"[..]));
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(open(&|| "v".into(), &bad).is_err(), "flip of byte {i} bit {bit} went unnoticed");
            }
        }
        assert!(open(&|| "v".into(), &[1, 2]).is_err());
    }
}
