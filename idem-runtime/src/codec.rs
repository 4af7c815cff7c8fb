//! How outputs are stored for replay.
//!
//! MessagePack with field names (`rmp_serde::to_vec_named`), behind a one-byte format tag.
//! Why: it is several times faster to write and read than JSON and about half its size (smaller
//! records mean fewer bytes per Redis reply), and unlike positional formats (bincode, postcard)
//! it is self-describing with named fields, so a record written by the previous deploy still
//! decodes after a field is added (with `#[serde(default)]`) or reordered, and serde attributes
//! that need a self-describing format (`flatten`, untagged enums) work.
//!
//! An output that cannot be stored (not serializable, or larger than the handler's
//! `max_output`) becomes an *unreplayable* record: the key is still marked done, so the handler
//! never runs twice, and duplicates are told why there is nothing to replay.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Format tag of a MessagePack record.
const MSGPACK: u8 = 1;
/// Format tag of a record whose output was not stored: the effect happened, so the key is marked
/// done, but there is nothing to replay. The reason follows as UTF-8.
const UNREPLAYABLE: u8 = 0xEE;

/// Why a stored record gives no value.
#[derive(Debug)]
pub(crate) enum Undecodable {
    /// Done, but the output was not stored.
    Unreplayable(String),
    /// Not a record this version can read.
    Corrupt(String),
}

/// Encode an output, at most `max` bytes. Never fails: an output that cannot be encoded, or is
/// larger, becomes an unreplayable record.
pub(crate) fn encode<T: Serialize>(value: &T, max: usize) -> Vec<u8> {
    let mut out = Bounded {
        buf: Vec::with_capacity(64.min(max.saturating_add(1))),
        max: max.saturating_add(1),
    };
    out.buf.push(MSGPACK);
    match rmp_serde::encode::write_named(&mut out, value) {
        Ok(()) => out.buf,
        Err(_) if out.buf.len() >= out.max => unreplayable(&format!(
            "the output is larger than max_output ({max} bytes)"
        )),
        Err(e) => unreplayable(&format!("the output could not be serialized: {e}")),
    }
}

/// A record that marks the key done without an output, saying why.
pub(crate) fn unreplayable(reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + reason.len());
    out.push(UNREPLAYABLE);
    out.extend_from_slice(reason.as_bytes());
    out
}

/// Whether `bytes` is an unreplayable record (so a store's refusal of it is not about its size).
pub(crate) fn is_unreplayable(bytes: &[u8]) -> bool {
    bytes.first() == Some(&UNREPLAYABLE)
}

/// Decode a stored output.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Undecodable> {
    match bytes.split_first() {
        Some((&MSGPACK, body)) => rmp_serde::from_slice(body).map_err(|e| {
            Undecodable::Corrupt(format!(
                "stored output does not decode as {}: {e}",
                std::any::type_name::<T>()
            ))
        }),
        Some((&UNREPLAYABLE, why)) => Err(Undecodable::Unreplayable(
            String::from_utf8_lossy(why).into_owned(),
        )),
        Some((tag, _)) => Err(Undecodable::Corrupt(format!(
            "unknown record format tag {tag:#04x}"
        ))),
        None => Err(Undecodable::Corrupt("empty record".to_owned())),
    }
}

/// A writer that refuses to grow past `max` bytes, so a huge output is not encoded whole just to
/// be thrown away.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.buf.resize(self.max, 0);
            return Err(std::io::Error::other("output over max_output"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let v = vec![7u8; 100];
        let bytes = encode(&v, 1000);
        assert_eq!(decode::<Vec<u8>>(&bytes).unwrap(), v);
        // Exactly at the limit is stored; one byte over is not.
        let exact = bytes.len() - 1;
        assert!(decode::<Vec<u8>>(&encode(&v, exact)).is_ok());
        let over = encode(&v, exact - 1);
        assert!(is_unreplayable(&over));
        match decode::<Vec<u8>>(&over) {
            Err(Undecodable::Unreplayable(why)) => assert!(why.contains("max_output"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(over.len() < 100);
    }

    #[test]
    fn unserializable_outputs_are_unreplayable() {
        struct Fails;
        impl Serialize for Fails {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("nope"))
            }
        }
        match decode::<()>(&encode(&Fails, 1000)) {
            Err(Undecodable::Unreplayable(why)) => assert!(why.contains("nope"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
