//! The store contract (`protocol.md`): four token-checked, atomic operations, and the stores
//! that honour it, one folder or file each.

pub(crate) mod layered;
pub(crate) mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub(crate) mod redis;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub mod sql;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::{Error, Fingerprint, Key, StoreError};

/// Proves ownership of a lease. 128 bits: a random per-process nonce and a per-process counter,
/// so two callers never share one (the counter) and two processes practically never do (the nonce).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u128);

impl Token {
    /// A token no other caller holds.
    ///
    /// ```
    /// let (a, b) = (idem_runtime::Token::generate(), idem_runtime::Token::generate());
    /// assert_ne!(a, b);
    /// ```
    pub fn generate() -> Token {
        static NONCE: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nonce = *NONCE.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            // std's RandomState is seeded from the OS's randomness once per process; hashing the
            // pid and the time as well keeps forked processes apart.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Token(((nonce as u128) << 64) | n as u128)
    }

    /// The token as 32 lowercase hex digits (how text-based stores keep it).
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:032x})", self.0)
    }
}

/// An in-flight claim on a key: who holds it (`token`) and its place in the order of the key's
/// leases (`fence`, strictly increasing per key; pass it to downstream writes so they can reject a
/// holder that outlived its lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Proves ownership.
    pub token: Token,
    /// Strictly greater than the fence of any earlier lease of the same key.
    pub fence: u64,
}

/// What `begin` asks for.
#[derive(Debug, Clone, Copy)]
pub struct BeginRequest<'a> {
    /// The namespace of the key.
    pub scope: &'a str,
    /// The key.
    pub key: &'a Key,
    /// The token the new lease will carry. A retried `begin` with the same token that already owns
    /// the key answers `Acquired` with the same fence (idempotent under retry).
    pub token: Token,
    /// Lease length, measured by the store's clock.
    pub ttl: Duration,
    /// Kept with the record; a later `begin` whose fingerprint differs from a DONE record's gets
    /// [`Begin::Mismatch`]. Compared only when both sides have one.
    pub fingerprint: Option<Fingerprint>,
}

/// The answer of [`Store::begin`], one row of the state table in `protocol.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key was absent (or its lease had expired): the caller holds it now and runs the handler.
    Acquired(Lease),
    /// Another live lease holds the key; it expires at the latest after `retry_after`.
    InFlight {
        /// Remaining lease time by the store's clock.
        retry_after: Duration,
    },
    /// The key is DONE: here is the stored output to replay.
    Completed {
        /// Exactly the bytes given to [`Store::complete`].
        output: Vec<u8>,
    },
    /// The key is DONE with a different fingerprint.
    Mismatch,
}

/// A backend that keeps idempotency records: the contract of `protocol.md`.
///
/// Every operation that changes state is atomic on the server and checked against the lease
/// token, and each is idempotent under retry. Expiry is decided by the store's own clock.
/// Run your implementation through `idem_runtime::store_conformance!` (feature
/// `conformance`) to prove it.
///
/// ```
/// use idem_runtime::{Begin, BeginRequest, Key, MemoryStore, Store, Token};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let key = Key::new(&7u64).unwrap();
/// let req = BeginRequest { scope: "doc", key: &key, token: Token::generate(), ttl: Duration::from_secs(5), fingerprint: None };
/// let Begin::Acquired(lease) = store.begin(&req).await.unwrap() else { panic!() };
/// store.complete("doc", &key, &lease, b"out", Duration::from_secs(60)).await.unwrap();
/// let again = BeginRequest { token: Token::generate(), ..req };
/// assert_eq!(store.begin(&again).await.unwrap(), Begin::Completed { output: b"out".to_vec() });
/// # });
/// ```
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Claim the key, or report why not. One atomic operation.
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError>;

    /// Mark the key DONE with `output`, kept for `keep`. Succeeds when `lease` still owns the key,
    /// when the key is already DONE by this same token (a retry), or when no other holder owns it
    /// (the lease lapsed but nobody took over: the effect happened, so recording it is right).
    /// Fails with [`StoreError::LeaseLost`] when another token holds or completed the key; that
    /// holder's record is left untouched.
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError>;

    /// Delete the key if `lease` still holds it in flight; otherwise do nothing (a retry, or the
    /// lease was taken over: the new holder's record is untouched).
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError>;

    /// Renew the lease to `ttl` from now. [`StoreError::LeaseLost`] when it no longer holds the key.
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Called from `Drop` when the handler's future was cancelled while holding the lease. Must not
    /// block; a network store spawns the release in the background. The default does nothing, so
    /// the key stays blocked until the lease's ttl elapses (never longer).
    fn release_detached(&self, scope: &str, key: &Key, lease: Lease) {
        let _ = (scope, key, lease);
    }

    /// Wait until the key's in-flight holder may have finished, for at most `max`. The wrapper
    /// calls `begin` again afterwards, so returning early is always correct. Stores that can
    /// signal completion override this; the default sleeps for `max`.
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        let _ = (scope, key);
        tokio::time::sleep(max).await
    }
}

/// Anything the wrapper can take a store from: a store, an `Arc` of one, `dyn Store`, or
/// [`DefaultStore`] (the process-wide default).
pub trait StoreHandle {
    /// The store, or [`Error::NoStore`].
    fn store(&self) -> Result<&dyn Store, Error>;
}

impl<S: Store> StoreHandle for S {
    fn store(&self) -> Result<&dyn Store, Error> {
        Ok(self)
    }
}
impl<S: Store> StoreHandle for Arc<S> {
    fn store(&self) -> Result<&dyn Store, Error> {
        Ok(&**self)
    }
}
impl StoreHandle for Arc<dyn Store> {
    fn store(&self) -> Result<&dyn Store, Error> {
        Ok(&**self)
    }
}
impl StoreHandle for dyn Store {
    fn store(&self) -> Result<&dyn Store, Error> {
        Ok(self)
    }
}

/// The process-wide default store, installed once with [`install_default_store`]. This is what
/// `#[idempotent]` uses when no `store = "..."` is given.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultStore;

static DEFAULT_STORE: OnceLock<Arc<dyn Store>> = OnceLock::new();

impl StoreHandle for DefaultStore {
    fn store(&self) -> Result<&dyn Store, Error> {
        DEFAULT_STORE.get().map(|s| &**s).ok_or(Error::NoStore)
    }
}

/// [`install_default_store`] was called when a default was already installed.
#[derive(Debug, thiserror::Error)]
#[error("a default idempotency store is already installed")]
pub struct AlreadyInstalled;

/// Install the store that `#[idempotent]` functions without `store = "..."` use. Call it once at
/// start-up; a second call is refused (a store swapped under running handlers would split the
/// key space).
///
/// ```
/// idem_runtime::install_default_store(idem_runtime::MemoryStore::new()).unwrap();
/// assert!(idem_runtime::install_default_store(idem_runtime::MemoryStore::new()).is_err());
/// ```
pub fn install_default_store(store: impl Store) -> Result<(), AlreadyInstalled> {
    DEFAULT_STORE
        .set(Arc::new(store))
        .map_err(|_| AlreadyInstalled)
}

/// The installed default store, if any.
pub fn default_store() -> Option<Arc<dyn Store>> {
    DEFAULT_STORE.get().cloned()
}
