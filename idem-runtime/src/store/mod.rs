//! The store contract (`protocol.md`): four token-checked, atomic operations, and the stores
//! that honour it, one folder or file each.

pub(crate) mod cached;
pub(crate) mod layered;
pub(crate) mod memory;
pub(crate) mod ops;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub(crate) mod redis;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub mod sql;

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::{Error, Fingerprint, Key, StoreError, TxRef};

/// Proves ownership of a lease. 128 bits: a random per-process nonce and a per-process counter,
/// so two callers of one process never share one (the counter) and two processes practically
/// never do (the nonce). A process that forks gets a nonce of its own at its first token (the
/// nonce is tied to the process id), so parent and child never issue the same tokens.
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
        Token::generate_in(std::process::id())
    }

    /// [`Token::generate`] in the process `pid` (the caller's, read once per call: `getpid` is a
    /// system call). Read from the kernel, never cached: a child made without fork hooks
    /// (`_Fork`, `clone` by system call) would keep a cached id, issue its parent's tokens and
    /// find its parent's watchdog, whose thread it does not have (`tests/fork_no_hooks.rs`).
    pub(crate) fn generate_in(pid: u32) -> Token {
        static NONCE: AtomicU64 = AtomicU64::new(0);
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        if NONCE_PID.load(Ordering::Acquire) != pid {
            NONCE.store(new_nonce(pid), Ordering::Release);
            NONCE_PID.store(pid, Ordering::Release);
        }
        let nonce = NONCE.load(Ordering::Acquire);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Token(((nonce as u128) << 64) | n as u128)
    }

    /// The token as 32 lowercase hex digits (how text-based stores keep it).
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// The process the token nonce was made in (0: none yet). A forked child inherits the parent's
/// memory, nonce and counter included; its own pid tells it to make a nonce of its own.
static NONCE_PID: AtomicU32 = AtomicU32::new(0);

/// This process's id as of its last token (no system call): who the leases it takes belong to.
// Used by the SQL stores only (memory and Redis keep no holders).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unreachable_pub)
)]
pub(crate) fn token_pid() -> u32 {
    match NONCE_PID.load(Ordering::Acquire) {
        0 => std::process::id(),
        pid => pid,
    }
}

fn new_nonce(pid: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState keys come from the OS's randomness; a forked child inherits them, so the
    // pid (which differs) and the time are hashed in too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(pid);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:032x})", self.0)
    }
}

/// An in-flight claim on a key: who holds it (`token`), its place in the order of the key's
/// leases (`fence`, strictly increasing per key; pass it to downstream writes so they can reject a
/// holder that outlived its lease), and the fingerprint of the request that took it (kept with
/// the done record, even when the store lost the in-flight one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Proves ownership.
    pub token: Token,
    /// Strictly greater than the fence of any earlier lease of the same key.
    pub fence: u64,
    /// The fingerprint of the [`BeginRequest`] that took the lease.
    pub fingerprint: Option<Fingerprint>,
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

impl BeginRequest<'_> {
    /// The lease this request takes, with the store's `fence`.
    ///
    /// ```
    /// # use idem_runtime::{BeginRequest, Key, Token};
    /// # use std::time::Duration;
    /// let key = Key::new("k").unwrap();
    /// let req = BeginRequest { scope: "s", key: &key, token: Token::generate(), ttl: Duration::from_secs(1), fingerprint: None };
    /// assert_eq!(req.lease(7).token, req.token);
    /// ```
    pub fn lease(&self, fence: u64) -> Lease {
        Lease {
            token: self.token,
            fence,
            fingerprint: self.fingerprint,
        }
    }
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
        /// The fingerprint the done record keeps (the lease's, given to [`Store::complete`]), so
        /// a copy of the record elsewhere (the layered store's front) checks what it checks.
        fingerprint: Option<Fingerprint>,
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
/// assert_eq!(store.begin(&again).await.unwrap(), Begin::Completed { output: b"out".to_vec(), fingerprint: None });
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
    /// holder's record is left untouched. The done record keeps `lease.fingerprint` (not
    /// necessarily the one the claim was made with: a copy of another store's record keeps that
    /// record's), also when the store no longer has the in-flight record (it lapsed, was purged
    /// or lost).
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

    /// Wait until the key's in-flight holder may have finished, for at most `max`. The wrapper
    /// calls `begin` again afterwards, so returning early is always correct. Stores that can
    /// signal completion override this; the default sleeps for `max`.
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        let _ = (scope, key);
        tokio::time::sleep(max).await
    }

    /// This store as idem's watchdog thread uses it: to renew leases while handlers run, and to
    /// finish a release or a done mark in the background when the caller's future was dropped.
    ///
    /// That thread runs its own runtime, so that a handler that blocks its thread (or all of the
    /// application's worker threads) never costs a lease. The store returned must therefore not
    /// depend on the application's runtime making progress: a network store opens connections of
    /// its own there (lazily, on first use); an in-process store returns a clone of itself.
    /// Called for every lease, so cache what it builds.
    ///
    /// ```
    /// # use idem_runtime::{MemoryStore, Store};
    /// let store = MemoryStore::new();
    /// let for_watchdog = store.for_watchdog(); // a clone: same records
    /// # let _ = for_watchdog;
    /// ```
    fn for_watchdog(&self) -> Arc<dyn Store>;

    /// How this store joins a caller's SQL transaction, for the transactional form
    /// (`#[idempotent(tx = "...")]`, `run_in_tx`): the SQL store and a layered store over one
    /// answer; the default, `None`, refuses with [`Error::NotTransactional`].
    fn transactional(&self) -> Option<&dyn TxStore> {
        None
    }
}

/// What a store does for the transactional form: claim, mark and release **in the caller's
/// transaction**, so the done mark commits or rolls back with the handler's writes. Implemented by
/// the SQL store (and a layered store over one); the connection is the transaction's, as a
/// [`TxRef`]: a connection of idem's sqlx, type-erased (`sqlx::PgConnection`, `MySqlConnection`
/// or `SqliteConnection`), or a PostgreSQL transaction of another library.
#[async_trait::async_trait]
pub trait TxStore: Send + Sync {
    /// Claim the key for a handler that will run in the transaction on `tx`.
    async fn begin_in(&self, tx: TxRef<'_>, req: &BeginRequest<'_>) -> Result<Begin, StoreError>;

    /// Write the done mark in the transaction on `tx`.
    async fn complete_in(
        &self,
        tx: TxRef<'_>,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError>;

    /// Free the key after the handler failed, where the claim was made outside the transaction
    /// (the claims made in it are undone with the savepoint taken before them). Never waits for
    /// a connection of the pool the caller's transaction holds.
    async fn release_in(
        &self,
        tx: TxRef<'_>,
        scope: &str,
        key: &Key,
        lease: &Lease,
    ) -> Result<(), StoreError>;

    /// Take the savepoint `name` in the transaction on `tx`: before the claim, where the claim is
    /// made in the transaction (so that undoing the handler undoes the claim too, and frees the
    /// key at once), after it otherwise. Names are unique per call, so nested calls on one
    /// transaction nest their savepoints (MySQL/MariaDB replace a savepoint of the same name).
    async fn savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError>;

    /// Undo everything since the savepoint `name` (the handler's writes, and a claim made in the
    /// transaction) after the handler failed or its done mark could not be written, so they can
    /// never commit without the mark, whatever the caller does next; then release the savepoint.
    async fn rollback_to_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError>;

    /// The done mark is written: the savepoint `name` is no longer needed.
    async fn release_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError>;

    /// Roll the whole transaction back on the server: what is left when undoing to a savepoint
    /// failed, so that nothing of the handler's can commit. The caller is then told that the
    /// transaction cannot be committed ([`Error::TransactionAborted`]).
    async fn abort_in(&self, tx: TxRef<'_>) -> Result<(), StoreError>;

    /// The key's done record (its output and fingerprint) as committed: read outside the
    /// caller's transaction, by a read that never waits for one, and never through a connection
    /// of the caller's pool. What a layered store may copy to its front after a claim in the
    /// transaction found the key done, since that record may be the caller's own mark, not yet
    /// committed. `None`: not done as far as committed data says (or the store cannot tell).
    async fn committed_done(
        &self,
        scope: &str,
        key: &Key,
    ) -> Result<Option<(Vec<u8>, Option<Fingerprint>)>, StoreError> {
        let _ = (scope, key);
        Ok(None)
    }

    /// Whether [`begin_in`](Self::begin_in) claims in the transaction (the claim ends with it),
    /// or outside it, as [`Store::begin`] does (then the transaction may begin after the claim).
    fn claims_in_tx(&self) -> bool;

    /// Whether a duplicate whose claim in the transaction found the key in flight may wait there
    /// ([`Options::wait`](crate::Options::wait)). Not where that claim holds a lock the holder
    /// needs to renew its lease and write its mark (SQLite's write lock): the holder would stall
    /// until its lease lapsed and the waiter took the key over. Such duplicates are answered
    /// [`Error::InFlight`](crate::Error::InFlight) at once.
    fn waits_in_tx(&self) -> bool {
        true
    }

    /// Whether a duplicate of a key done and committed is answered from
    /// [`committed_done`](Self::committed_done) before any claim in the transaction (so before
    /// the transaction is begun, where idem begins it): where that claim takes a lock that
    /// would make duplicates queue behind every writer (SQLite's write lock). Not for a store
    /// that must see every duplicate's claim (a layered store copies the done record to its
    /// front then). Off by default.
    fn replays_committed_first(&self) -> bool {
        false
    }

    /// What renews a transactional lease while the handler runs, and releases it if the caller
    /// is cancelled: `None` when the transaction itself holds the lease (it ends with the
    /// transaction, a crash included).
    fn renewer_in_tx(&self) -> Option<Arc<dyn Store>>;

    /// Called after the done mark was written in a transaction that the caller will commit.
    async fn marked_in(&self, scope: &str, key: &Key, lease: &Lease) {
        let _ = (scope, key, lease);
    }
}

/// An `Arc` of a store is a store (so is `Arc<dyn Store>`).
#[async_trait::async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        (**self).begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        (**self).complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        (**self).release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (**self).extend(scope, key, lease, ttl).await
    }
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        (**self).wait(scope, key, max).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        (**self).for_watchdog()
    }
    fn transactional(&self) -> Option<&dyn TxStore> {
        (**self).transactional()
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
