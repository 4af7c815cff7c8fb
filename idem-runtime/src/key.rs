//! Business keys: what can be a key, how composite keys are built, and payload fingerprints.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::Error;

/// Keys longer than this (in bytes) are replaced by their SHA-256, never truncated: two long keys
/// that share a prefix must not collide.
pub const MAX_KEY_LEN: usize = 200;

const HASHED_PREFIX: &str = "sha256:";

/// A value that can be (part of) an idempotency key: integers, strings, UUIDs written as text, and
/// user types that opt in.
///
/// Implement it for your own id types; keep the text stable across deploys, since it is what the
/// store compares:
///
/// ```
/// use idem_runtime::KeyPart;
///
/// struct OrderId(u64);
/// impl KeyPart for OrderId {
///     fn write_key(&self, out: &mut String) {
///         self.0.write_key(out)
///     }
/// }
/// let key = idem_runtime::Key::new(&OrderId(42)).unwrap();
/// assert_eq!(key.as_str(), "42");
/// let uuid_like = [0x67, 0xe5, 0x50, 0x44, 0x10, 0xb1, 0x42, 0x6f, 0x92, 0x47, 0xbb, 0x68, 0x0e, 0x5f, 0xe0, 0xc8];
/// assert_eq!(idem_runtime::Key::new(&uuid_like).unwrap().as_str(), "67e55044-10b1-426f-9247-bb680e5fe0c8");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "this is not a key type",
    note = "keys can be integers, strings, `char`, `bool`, or a type that implements `idem_runtime::KeyPart`; or key on one of its fields (`key = \"msg.order_id\"`)"
)]
pub trait KeyPart {
    /// Append this value's key text to `out`.
    fn write_key(&self, out: &mut String);
}

impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
impl<T: KeyPart + ?Sized> KeyPart for &mut T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
impl<T: KeyPart + ?Sized> KeyPart for std::sync::Arc<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
impl KeyPart for str {
    fn write_key(&self, out: &mut String) {
        out.push_str(self)
    }
}
impl KeyPart for String {
    fn write_key(&self, out: &mut String) {
        out.push_str(self)
    }
}
impl KeyPart for std::borrow::Cow<'_, str> {
    fn write_key(&self, out: &mut String) {
        out.push_str(self)
    }
}

macro_rules! display_key_part {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn write_key(&self, out: &mut String) {
                // Writing to a String cannot fail.
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
display_key_part!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, char, bool
);
display_key_part!(
    std::num::NonZeroU32,
    std::num::NonZeroU64,
    std::num::NonZeroU128,
    std::num::NonZeroI64
);

/// UUIDs and other 16-byte ids are keyed by their canonical hyphenated lowercase hex form.
impl KeyPart for [u8; 16] {
    fn write_key(&self, out: &mut String) {
        for (i, b) in self.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out.push('-');
            }
            let _ = write!(out, "{b:02x}");
        }
    }
}

/// Keyed by the hyphenated lowercase form, the same text as `[u8; 16]` of the same bytes.
#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
impl KeyPart for uuid::Uuid {
    fn write_key(&self, out: &mut String) {
        self.as_bytes().write_key(out)
    }
}

/// A validated idempotency key, ready for a store: never empty, at most [`MAX_KEY_LEN`] bytes,
/// no NUL (longer keys, and keys with NUL, are replaced by `sha256:<hex>` of their text).
///
/// ```
/// use idem_runtime::Key;
/// assert_eq!(Key::new(&42u64).unwrap().as_str(), "42");
/// assert!(Key::new("").is_err());
/// let long = "x".repeat(1000);
/// assert!(Key::new(long.as_str()).unwrap().as_str().starts_with("sha256:"));
/// assert!(Key::new("a\0b").unwrap().as_str().starts_with("sha256:"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// Build a key from one value.
    pub fn new<K: KeyPart + ?Sized>(part: &K) -> Result<Key, Error> {
        let mut s = String::new();
        part.write_key(&mut s);
        Key::from_text(s)
    }

    /// Validate key text that is already built.
    pub fn from_text(text: String) -> Result<Key, Error> {
        if text.is_empty() {
            return Err(Error::InvalidKey {
                reason: "the key is empty",
            });
        }
        if text.len() > MAX_KEY_LEN || text.starts_with(HASHED_PREFIX) || text.contains('\0') {
            // A user key that already looks hashed is hashed again, so it can never be mistaken
            // for (and collide with) the hash of some long key. NUL is refused by PostgreSQL's
            // text type and used as a separator by some stores: such keys are hashed too.
            let digest = Sha256::digest(text.as_bytes());
            let mut h = String::with_capacity(HASHED_PREFIX.len() + 64);
            h.push_str(HASHED_PREFIX);
            for b in digest {
                let _ = write!(h, "{b:02x}");
            }
            return Ok(Key(h));
        }
        Ok(Key(text))
    }

    /// The key text as stores see it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds a key from a template such as `"{tenant}:{order.id}"`.
///
/// Characters of the template's literal text (and `%`) are percent-escaped inside each part, so
/// parts can never be confused: `("a:b", "c")` and `("a", "b:c")` give different keys.
///
/// ```
/// use idem_runtime::KeyBuilder;
/// let mut b = KeyBuilder::new(":");
/// b.part(&"a:b");
/// b.lit(":");
/// b.part(&7u32);
/// assert_eq!(b.finish().unwrap().as_str(), "a%3Ab:7");
/// ```
#[derive(Debug)]
pub struct KeyBuilder {
    out: String,
    scratch: String,
    reserved: &'static str,
}

impl KeyBuilder {
    /// A builder whose parts escape `%` and every character of `reserved`.
    pub fn new(reserved: &'static str) -> Self {
        KeyBuilder {
            out: String::new(),
            scratch: String::new(),
            reserved,
        }
    }

    /// Append literal template text.
    pub fn lit(&mut self, s: &str) -> &mut Self {
        self.out.push_str(s);
        self
    }

    /// Append one value, escaped.
    pub fn part<K: KeyPart + ?Sized>(&mut self, k: &K) -> &mut Self {
        self.scratch.clear();
        k.write_key(&mut self.scratch);
        for c in self.scratch.chars() {
            if c == '%' || self.reserved.contains(c) {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(self.out, "%{b:02X}");
                }
            } else {
                self.out.push(c);
            }
        }
        self
    }

    /// The finished, validated key.
    pub fn finish(&mut self) -> Result<Key, Error> {
        Key::from_text(std::mem::take(&mut self.out))
    }
}

/// A hash of the payload that must match when a completed key is seen again (the IETF/Stripe
/// "same key, different request" check).
///
/// It is computed from the values' serde serialization (MessagePack) with SHA-256, so it is stable
/// across processes and deploys as long as the values serialize the same way (a `HashMap`'s order
/// is not stable: use a `BTreeMap` in fingerprinted payloads).
///
/// ```
/// use idem_runtime::Fingerprint;
/// let a = Fingerprint::builder().add(&("alice", 10u32)).finish();
/// let b = Fingerprint::builder().add(&("alice", 11u32)).finish();
/// assert_ne!(a, b);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    /// Start a fingerprint over several values.
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder {
            hasher: Sha256::new(),
            buf: Vec::new(),
        }
    }
}

/// Accumulates values into a [`Fingerprint`].
#[derive(Debug)]
pub struct FingerprintBuilder {
    hasher: Sha256,
    buf: Vec<u8>,
}

impl FingerprintBuilder {
    /// Add one value. A value that cannot be serialized is hashed by its error text, which is
    /// still deterministic.
    // Named like `Add::add` on purpose: it reads as "add this value"; it is not arithmetic.
    #[allow(clippy::should_implement_trait)]
    pub fn add<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.buf.clear();
        if let Err(e) = rmp_serde::encode::write_named(&mut self.buf, value) {
            self.buf.clear();
            self.buf.extend_from_slice(e.to_string().as_bytes());
        }
        // Length-prefix each value so that value boundaries are part of the hash.
        self.hasher.update((self.buf.len() as u64).to_le_bytes());
        self.hasher.update(&self.buf);
        self
    }

    /// The fingerprint.
    pub fn finish(self) -> Fingerprint {
        let d = self.hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        Fingerprint(out)
    }
}
