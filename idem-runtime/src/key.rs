//! Business keys: what can be a key, how composite keys are built, and payload fingerprints.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

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
    note = "keys can be integers, strings, `char`, `bool`, a type with `Display` other than a float (e.g. another crate's `Uuid`), or a type that implements `idem_runtime::KeyPart`; or key on one of its fields (`key = \"msg.order_id\"`); an `Option` is a key only of an `idem_runtime::OptionalKey` type, such as idem-http's `IdempotencyKey` (`None`: a call without a key)"
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

/// A key type whose `Option` is an optional key: with `#[idempotent]`, a key (or a template's
/// part) of type `Option<K>` that is `None` makes the call one without a key, which runs as a
/// plain call (no claim, no replay, no mark). It is for keys a client may leave out, such as
/// idem-http's `IdempotencyKey` (an optional `Idempotency-Key` header), also under a per-caller
/// template (`key = "{user}/{key}"`). An `Option` of any other type is refused at compile time:
/// a message whose `order_id` field is `None` by accident must not be processed once per
/// delivery.
///
/// ```
/// use idem_runtime::{KeyPart, OptionalKey};
///
/// /// A header the client may send.
/// struct RequestId(String);
/// impl KeyPart for RequestId {
///     fn write_key(&self, out: &mut String) {
///         self.0.write_key(out)
///     }
/// }
/// impl OptionalKey for RequestId {}
/// ```
pub trait OptionalKey: KeyPart {}

/// A value keyed by its `Display` text: for an id type of another crate, which cannot implement
/// [`KeyPart`] (another version of `uuid`, a database library's id). `#[idempotent]` uses it by
/// itself for a key of a type that is not a `KeyPart` but has `Display`; with [`Call::new`] and
/// [`KeyBuilder::part`], wrap the value. Its text must stay the same across deploys: it is what
/// the store compares. A type that is a `KeyPart` is always keyed by it, except in a generic
/// handler whose key parameter is bound by `Display` only (`T: Display`): there rustc can only
/// use `Display`, so bound it by `KeyPart` where the two texts differ (and such a handler called
/// with a float keys it by its text, which a concrete float key is refused for).
///
/// ```
/// use idem_runtime::{DisplayKey, Key};
/// struct ForeignId(u32); // stands for a type of another crate
/// impl std::fmt::Display for ForeignId {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         write!(f, "F-{}", self.0)
///     }
/// }
/// let key = Key::new(&DisplayKey::new(&ForeignId(7))).unwrap();
/// assert_eq!(key.as_str(), "F-7");
/// ```
///
/// [`Call::new`]: crate::Call::new
pub struct DisplayKey<'a, T: ?Sized>(pub(crate) &'a T);

impl<'a, T: std::fmt::Display + ?Sized> DisplayKey<'a, T> {
    /// Key `value` by its `Display` text.
    pub fn new(value: &'a T) -> DisplayKey<'a, T> {
        DisplayKey(value)
    }
}

impl<T: std::fmt::Display + ?Sized> KeyPart for DisplayKey<'_, T> {
    fn write_key(&self, out: &mut String) {
        let _ = write!(out, "{}", self.0);
    }
}

/// A validated idempotency key, ready for a store: never empty, at most [`MAX_KEY_LEN`] bytes,
/// no NUL (longer keys, and keys with NUL, are replaced by `sha256:<hex>` of their text).
///
/// Keys are often personal data (an e-mail, an account number), so a key's `Display` and `Debug`
/// (which is what idem's errors and logs print) show a short keyed hash, `redacted:9f86d081884c`,
/// not the key (see [`set_redaction_key`]). [`reveal_keys(true)`](reveal_keys) shows the keys themselves, for development.
/// [`Key::as_str`] always gives the text.
///
/// ```
/// use idem_runtime::Key;
/// assert_eq!(Key::new(&42u64).unwrap().as_str(), "42");
/// assert!(Key::new("").is_err());
/// let long = "x".repeat(1000);
/// assert!(Key::new(long.as_str()).unwrap().as_str().starts_with("sha256:"));
/// assert!(Key::new("a\0b").unwrap().as_str().starts_with("sha256:"));
/// let email = Key::new("ann@example.com").unwrap();
/// assert!(!email.to_string().contains("ann"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
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
            let mut h = String::with_capacity(HASHED_PREFIX.len() + 64);
            h.push_str(HASHED_PREFIX);
            push_hex(&mut h, &Sha256::digest(text.as_bytes()));
            return Ok(Key(h));
        }
        Ok(Key(text))
    }

    /// The key text as stores see it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

static REVEAL_KEYS: AtomicBool = AtomicBool::new(false);

/// Show keys themselves, not their redacted form, in idem's errors and logs (`Display` and
/// `Debug` of [`Key`] and of [`Error`]). Off by default, because keys are often personal data;
/// turn it on in development, or where your logs may hold the keys. Process-wide.
///
/// ```
/// use idem_runtime::{Key, reveal_keys};
/// let key = Key::new("order-7").unwrap();
/// reveal_keys(true);
/// assert_eq!(key.to_string(), "order-7");
/// reveal_keys(false);
/// assert!(key.to_string().starts_with("redacted:"));
/// ```
pub fn reveal_keys(reveal: bool) {
    REVEAL_KEYS.store(reveal, Ordering::Relaxed);
}

/// The secret the redacted form of keys is keyed with (see [`set_redaction_key`]).
static REDACTION_KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// The environment variable a redaction secret is read from, when [`set_redaction_key`] was not
/// called first.
pub const REDACTION_KEY_ENV: &str = "IDEM_REDACTION_KEY";

/// [`set_redaction_key`] came after a key had already been redacted with another secret.
#[derive(Debug, thiserror::Error)]
#[error("the redaction secret is already in use: set it at start-up, before any key is printed")]
pub struct RedactionKeyInUse;

/// Key the redacted form of keys with `secret`: the same secret in every process of a deployment
/// makes a key's redacted form the same in all of their logs (to find its lines), and nobody
/// without the secret can recover a key by hashing candidates (order numbers are a small space).
/// Call it once at start-up, before any key is printed; or set the environment variable
/// [`REDACTION_KEY_ENV`] (`IDEM_REDACTION_KEY`). With neither, each process draws a random
/// secret: redacted forms are then not comparable across processes.
///
/// ```
/// // At start-up, from your configuration (a secret, like a password):
/// idem_runtime::set_redaction_key(b"correct horse battery staple").unwrap();
/// let key = idem_runtime::Key::new("order-7").unwrap();
/// assert!(key.to_string().starts_with("redacted:"));
/// assert!(idem_runtime::set_redaction_key(b"another").is_err()); // already in use
/// ```
pub fn set_redaction_key(secret: &[u8]) -> Result<(), RedactionKeyInUse> {
    let derived = derive_redaction_key(secret);
    let mut fresh = false;
    let now = REDACTION_KEY.get_or_init(|| {
        fresh = true;
        derived
    });
    if fresh || *now == derived {
        Ok(())
    } else {
        Err(RedactionKeyInUse)
    }
}

fn derive_redaction_key(secret: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"idem redaction key\0")
        .chain_update(secret)
        .finalize()
        .into()
}

fn redaction_key() -> &'static [u8; 32] {
    REDACTION_KEY.get_or_init(|| match std::env::var_os(REDACTION_KEY_ENV) {
        Some(v) if !v.is_empty() => derive_redaction_key(v.as_encoded_bytes()),
        _ => {
            // No secret given: a random one for this process (std's RandomState is seeded by
            // the OS's randomness).
            use std::hash::{BuildHasher, Hasher};
            let state = std::collections::hash_map::RandomState::new();
            let mut out = [0u8; 32];
            for (i, chunk) in out.chunks_mut(8).enumerate() {
                let mut h = state.build_hasher();
                h.write_usize(i);
                chunk.copy_from_slice(&h.finish().to_le_bytes());
            }
            out
        }
    })
}

/// HMAC-SHA-256 of `msg` under `key` (RFC 2104).
fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let (mut inner_pad, mut outer_pad) = ([0x36u8; 64], [0x5cu8; 64]);
    for (i, k) in key.iter().enumerate() {
        inner_pad[i] ^= k;
        outer_pad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(inner_pad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(outer_pad)
        .chain_update(inner)
        .finalize()
        .into()
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if REVEAL_KEYS.load(Ordering::Relaxed) {
            return f.write_str(&self.0);
        }
        // 48 bits of a keyed hash (HMAC-SHA-256 under the redaction secret): enough to tell keys
        // apart in logs and to find a key's lines with the secret; without it, hashing every
        // candidate key recovers nothing.
        let mut h = String::with_capacity(9 + 12);
        h.push_str("redacted:");
        push_hex(
            &mut h,
            &hmac_sha256(redaction_key(), self.0.as_bytes())[..6],
        );
        f.write_str(&h)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({self})")
    }
}

/// Builds a key from a template such as `"{tenant}:{order.id}"`.
///
/// Characters of the template's literal text (and `%`) are percent-escaped inside each part, so
/// parts can never be confused: `("a:b", "c")` and `("a", "b:c")` give different keys. Two parts
/// with no literal text between them (`"{a}{b}"`) are separated by `%-`, which no escaped part
/// contains, so `("ab", "c")` and `("a", "bc")` differ too.
///
/// ```
/// use idem_runtime::KeyBuilder;
/// let mut b = KeyBuilder::new(":");
/// b.part(&"a:b");
/// b.lit(":");
/// b.part(&7u32);
/// assert_eq!(b.finish().unwrap().as_str(), "a%3Ab:7");
///
/// let adjacent = |x: &str, y: &str| {
///     let mut b = KeyBuilder::new("");
///     b.part(&x).part(&y);
///     b.finish().unwrap()
/// };
/// assert_ne!(adjacent("ab", "c"), adjacent("a", "bc"));
/// ```
#[derive(Debug)]
pub struct KeyBuilder {
    out: String,
    scratch: String,
    reserved: &'static str,
    /// The last thing appended was a part: the next part needs a separator.
    after_part: bool,
}

impl KeyBuilder {
    /// A builder whose parts escape `%` and every character of `reserved`.
    pub fn new(reserved: &'static str) -> Self {
        KeyBuilder {
            out: String::new(),
            scratch: String::new(),
            reserved,
            after_part: false,
        }
    }

    /// Append literal template text.
    pub fn lit(&mut self, s: &str) -> &mut Self {
        self.out.push_str(s);
        self.after_part = s.is_empty() && self.after_part;
        self
    }

    /// Append one value, escaped.
    pub fn part<K: KeyPart + ?Sized>(&mut self, k: &K) -> &mut Self {
        if self.after_part {
            // `%` is always escaped inside a part (`%25`), so `%-` can only be this separator.
            self.out.push_str("%-");
        }
        self.after_part = true;
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
        self.after_part = false;
        Key::from_text(std::mem::take(&mut self.out))
    }
}

/// A hash of the payload that must match when a completed key is seen again (the IETF/Stripe
/// "same key, different request" check).
///
/// # What it is computed from, and what changes it
///
/// Each value is serialized with serde into a canonical form (JSON's data model, with the fields
/// of structs and the entries of maps sorted by name) and hashed with SHA-256. So the fingerprint
/// is the same in every process and across deploys as long as the *data* is the same:
///
/// - it does **not** change when the fields of a struct are reordered, or with the iteration order
///   of a `HashMap`;
/// - it **does** change when a field is added, removed or renamed (even one with a default),
///   when a field's type changes how it serializes (`u32` to `String`, an enum's representation),
///   or with `#[serde(skip_serializing_if)]` choices.
///
/// The stable choice is to fingerprint the values that define the operation, not a whole request
/// struct: `fingerprint = "body.amount, body.currency"` on the attribute, or
/// [`add`](FingerprintBuilder::add) per field. [`add_bytes`](FingerprintBuilder::add_bytes)
/// hashes bytes as they are (e.g. a raw request body).
///
/// A value that cannot be serialized (a map whose keys are not strings, numbers or booleans, a
/// `Serialize` impl that fails) is an error, [`Error::InvalidFingerprint`]: the handler does not
/// run. (As in JSON, a float that is NaN or infinite hashes like `None`.)
///
/// ```
/// use idem_runtime::Fingerprint;
/// let a = Fingerprint::builder().add(&("alice", 10u32)).finish().unwrap();
/// let b = Fingerprint::builder().add(&("alice", 11u32)).finish().unwrap();
/// assert_ne!(a, b);
/// let tuple_keys: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
/// assert!(Fingerprint::of(&tuple_keys).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    /// Start a fingerprint over several values.
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder {
            hasher: Sha256::new(),
            buf: Vec::new(),
            error: None,
        }
    }

    /// The fingerprint of one value.
    ///
    /// ```
    /// # use idem_runtime::Fingerprint;
    /// assert_eq!(Fingerprint::of(&7u8).unwrap(), Fingerprint::builder().add(&7u8).finish().unwrap());
    /// ```
    pub fn of<T: serde::Serialize + ?Sized>(value: &T) -> Result<Fingerprint, Error> {
        Fingerprint::builder().add(value).finish()
    }
}

/// Lets [`Call::fingerprint`](crate::Call::fingerprint) take a [`Fingerprint`] or the result of
/// [`FingerprintBuilder::finish`].
impl From<Fingerprint> for Result<Fingerprint, Error> {
    fn from(fp: Fingerprint) -> Self {
        Ok(fp)
    }
}

/// Accumulates values into a [`Fingerprint`].
#[derive(Debug)]
pub struct FingerprintBuilder {
    hasher: Sha256,
    buf: Vec<u8>,
    error: Option<String>,
}

impl FingerprintBuilder {
    /// Add one value, in its canonical form (see [`Fingerprint`]). A value that cannot be
    /// serialized makes [`finish`](Self::finish) fail.
    // Named like `Add::add` on purpose: it reads as "add this value"; it is not arithmetic.
    #[allow(clippy::should_implement_trait)]
    pub fn add<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        if self.error.is_some() {
            return self;
        }
        self.buf.clear();
        match serde_json::to_value(value) {
            Ok(v) => match canonical(&v, &mut self.buf) {
                Ok(()) => self.push(),
                Err(e) => self.error = Some(e),
            },
            Err(e) => self.error = Some(e.to_string()),
        }
        self
    }

    /// Add bytes as they are (a raw request body, a canonical form of your own).
    pub fn add_bytes(mut self, bytes: &[u8]) -> Self {
        self.buf.clear();
        self.buf.extend_from_slice(bytes);
        self.push();
        self
    }

    fn push(&mut self) {
        // Length-prefix each value so that value boundaries are part of the hash.
        self.hasher.update((self.buf.len() as u64).to_le_bytes());
        self.hasher.update(&self.buf);
    }

    /// The fingerprint, or [`Error::InvalidFingerprint`] when a value could not be serialized.
    pub fn finish(self) -> Result<Fingerprint, Error> {
        if let Some(reason) = self.error {
            return Err(Error::InvalidFingerprint { reason });
        }
        let d = self.hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        Ok(Fingerprint(out))
    }
}

/// Write `v` canonically: JSON text with object keys sorted, whatever order the map kept them in
/// (serde_json's `preserve_order` feature may be on in the application's dependency graph).
fn canonical(v: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), String> {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).map_err(|e| e.to_string())?;
                out.push(b':');
                canonical(v, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out)?;
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).map_err(|e| e.to_string())?,
    }
    Ok(())
}
