//! The record format and the bytes around the scripts: key escaping, expiry clamping, error
//! mapping, and the decoding of a done record (see the module docs of the Redis store).

use std::time::Duration;

use redis::RedisError;

use crate::StoreError;
use crate::store::{Begin, Token};

pub(super) const TAG_DONE: u8 = b'D';
pub(super) const TAG_IN_FLIGHT: u8 = b'I';
/// Tag + token + fingerprint length.
pub(super) const HEADER: usize = 18;
/// The longest expiry handed to Redis (about 100 years): longer durations are clamped.
pub(super) const MAX_EXPIRY_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

pub(super) fn push_escaped(out: &mut Vec<u8>, text: &[u8]) {
    let special = |b: &u8| matches!(b, b'%' | b'{' | b'|' | b'}');
    if !text.iter().any(special) {
        out.extend_from_slice(text);
        return;
    }
    for &b in text {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b'{' => out.extend_from_slice(b"%7B"),
            b'|' => out.extend_from_slice(b"%7C"),
            b'}' => out.extend_from_slice(b"%7D"),
            _ => out.push(b),
        }
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    (d.as_millis().min(MAX_EXPIRY_MS as u128) as u64).max(1)
}

pub(super) fn in_flight_prefix(token: Token) -> [u8; 17] {
    let mut p = [0u8; 17];
    p[0] = TAG_IN_FLIGHT;
    p[1..].copy_from_slice(&token.0.to_be_bytes());
    p
}

pub(super) fn store_error(e: RedisError) -> StoreError {
    // A key of ours holding another type: someone else wrote there. Everything else
    // (connection, timeout, cluster down, OOM, ...) is unavailability.
    let foreign = e.code() == Some("WRONGTYPE");
    if foreign {
        StoreError::Corrupt(format!("a key of the store holds foreign data: {e}"))
    } else {
        StoreError::Unavailable(Box::new(e))
    }
}

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("Redis record {what}"))
}

/// Decode a record `begin` answered with: a done record (replay or mismatch), or garbage.
pub(super) fn decode_done(
    mut record: Vec<u8>,
    fingerprint: Option<crate::Fingerprint>,
) -> Result<Begin, StoreError> {
    if record.first() != Some(&TAG_DONE) {
        return Err(corrupt("has an unknown format"));
    }
    let fp_len = match record.get(HEADER - 1) {
        Some(&n @ (0 | 16)) => n as usize,
        _ => return Err(corrupt("has a bad header")),
    };
    if record.len() < HEADER + fp_len {
        return Err(corrupt("is truncated"));
    }
    if let (16, Some(expected)) = (fp_len, fingerprint)
        && record[HEADER..HEADER + 16] != expected.0
    {
        return Ok(Begin::Mismatch);
    }
    let kept = (fp_len == 16).then(|| {
        let mut f = [0u8; 16];
        f.copy_from_slice(&record[HEADER..HEADER + 16]);
        crate::Fingerprint(f)
    });
    record.drain(..HEADER + fp_len);
    Ok(Begin::Completed {
        output: record,
        fingerprint: kept,
    })
}

/// The fingerprint field of a record: its length (0 or 16), then the fingerprint.
pub(super) fn fingerprint_field(fp: Option<crate::Fingerprint>, out: &mut Vec<u8>) {
    match fp {
        Some(f) => {
            out.push(16);
            out.extend_from_slice(&f.0);
        }
        None => out.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_pairs_apart_and_the_tag_closed() {
        let mut a = Vec::new();
        push_escaped(&mut a, b"a|b}{%");
        assert_eq!(a, b"a%7Cb%7D%7B%25");
    }

    #[test]
    fn done_records_decode() {
        let fp = crate::Fingerprint([7; 16]);
        let mut rec = vec![TAG_DONE];
        rec.extend_from_slice(&[1; 16]);
        rec.push(16);
        rec.extend_from_slice(&fp.0);
        rec.extend_from_slice(b"out");
        assert_eq!(
            decode_done(rec.clone(), Some(fp)).unwrap(),
            Begin::Completed {
                output: b"out".to_vec(),
                fingerprint: Some(fp),
            }
        );
        assert_eq!(
            decode_done(rec.clone(), None).unwrap(),
            Begin::Completed {
                output: b"out".to_vec(),
                fingerprint: Some(fp),
            }
        );
        assert_eq!(
            decode_done(rec, Some(crate::Fingerprint([8; 16]))).unwrap(),
            Begin::Mismatch
        );
        assert!(matches!(
            decode_done(b"garbage".to_vec(), None),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_done(b"D123".to_vec(), None),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn expiries_are_clamped() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
