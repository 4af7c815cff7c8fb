//! An in-process cache of DONE records in front of any store (see [`CachedStore`]).
//!
//! The pieces: this file holds the type, its settings and the [`Store`] answers; `table.rs` the
//! bounded, sharded table of cached records; `ops.rs` the operations, which forget a key here
//! as well as in the store.

mod ops;
#[cfg(test)]
mod review;
mod table;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{Key, StoreError};
use table::Table;

/// How many records are cached at most, by default.
const DEFAULT_CAPACITY: usize = 10_000;
/// How many bytes of outputs are cached at most, by default.
const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Outputs larger than this are not cached, by default (they are answered by the store).
const DEFAULT_MAX_OUTPUT: usize = 64 << 10;
/// How long a record is served from the cache at most, by default, even when its `keep` is
/// longer: this bounds how long a record forgotten elsewhere (by another process's operator) is
/// still replayed here.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// A record is served this much less than its `keep`: stores keep time to the millisecond (Redis
/// rounds `keep` down to whole milliseconds, SQLite's clock has millisecond precision), so their
/// record may end up to a millisecond before `sent + keep`.
const CLOCK_MARGIN: Duration = Duration::from_millis(2);

/// A store with an in-process cache of DONE records in front of it: a duplicate of a key this
/// process completed is answered from memory, without a round trip (Powertools calls this the
/// local cache). Opt-in; everything else goes to the store underneath, unchanged.
///
/// # What it caches, and for how long
///
/// Only what is known to be DONE: a record enters the cache when [`Store::complete`] of the
/// store underneath returned `Ok` through this store, with the fingerprint it was completed with.
/// It is served until the first of
/// - its `keep`, measured from just **before** the `complete` was sent (so never after the store's
///   own record expires: the store starts its clock later; less 2 ms, for the stores that keep
///   time to the millisecond),
/// - [`max_age`](CachedStoreBuilder::max_age) after it was cached (60 s by default),
/// - its eviction: the cache holds at most [`capacity`](CachedStoreBuilder::capacity) records
///   and [`max_bytes`](CachedStoreBuilder::max_bytes) of outputs (oldest out first); an output
///   larger than [`max_output`](CachedStoreBuilder::max_output) is not cached.
///
/// A retry of a `complete` that failed through this store (its answer lost, the record maybe
/// written by it) is not cached: the store's record may be the earlier attempt's, with its clock
/// and its output. Nor, while the cache had no room to track a failed `complete`, is any mark of
/// its shard, until that `complete`'s `keep` has passed.
///
/// Records another process completed are answered by the store as before, and are not cached,
/// unless you opt in with [`learn_replays_for`](CachedStoreBuilder::learn_replays_for): the store's
/// answer does not say how much of the record's `keep` is left, so you state a bound.
///
/// A cached answer is the store's answer: the same output and fingerprint, checked the same way
/// (a request with another fingerprint is sent to the store, which answers
/// [`Begin::Mismatch`]), per scope. Claims, in-flight answers, releases and renewals always go
/// to the store; so does the transactional form (its marks commit with the caller's transaction,
/// which this store cannot see, so they are never cached).
///
/// # What it cannot see
///
/// A record changed in the store by someone else while it is cached here: forgotten by an
/// operator in another process (the `idem` command line), deleted by hand, lost in a Redis flush.
/// This process replays it until `max_age` (or `keep`) ends. Forgetting through this store's own
/// [`Operations`](crate::Operations), or [`CachedStore::invalidate`], drops it here at once.
///
/// ```
/// use idem_runtime::{CachedStore, MemoryStore};
/// use std::time::Duration;
///
/// let store = CachedStore::builder(MemoryStore::new())
///     .capacity(50_000)
///     .max_age(Duration::from_secs(30))
///     .build();
/// idem_runtime::install_default_store(store).unwrap();
/// ```
pub struct CachedStore<S> {
    inner: Arc<S>,
    table: Arc<Table>,
    max_age: Duration,
    max_output: usize,
    learn_for: Option<Duration>,
}

impl<S> fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("cached", &self.table.len())
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl<S> Clone for CachedStore<S> {
    fn clone(&self) -> Self {
        CachedStore {
            inner: self.inner.clone(),
            table: self.table.clone(),
            max_age: self.max_age,
            max_output: self.max_output,
            learn_for: self.learn_for,
        }
    }
}

/// Settings of a [`CachedStore`]; from [`CachedStore::builder`].
#[derive(Debug)]
#[must_use]
pub struct CachedStoreBuilder<S> {
    inner: S,
    capacity: usize,
    max_bytes: usize,
    max_output: usize,
    max_age: Duration,
    learn_for: Option<Duration>,
}

impl<S: Store> CachedStore<S> {
    /// A cache with the default settings in front of `store`.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// # let _ = store;
    /// ```
    pub fn new(store: S) -> Self {
        CachedStore::builder(store).build()
    }

    /// Settings for a cache in front of `store`.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::builder(idem_runtime::MemoryStore::new())
    ///     .capacity(1_000)
    ///     .build();
    /// # let _ = store;
    /// ```
    pub fn builder(store: S) -> CachedStoreBuilder<S> {
        CachedStoreBuilder {
            inner: store,
            capacity: DEFAULT_CAPACITY,
            max_bytes: DEFAULT_MAX_BYTES,
            max_output: DEFAULT_MAX_OUTPUT,
            max_age: DEFAULT_MAX_AGE,
            learn_for: None,
        }
    }
}

impl<S> CachedStore<S> {
    /// The store underneath.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// let _memory: &idem_runtime::MemoryStore = store.inner();
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Drop the key's cached record, if any (the store's record is untouched): the next
    /// duplicate asks the store.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// store.invalidate("payments", &idem_runtime::Key::new("order-1").unwrap());
    /// ```
    pub fn invalidate(&self, scope: &str, key: &Key) {
        self.table.remove(scope, key);
    }

    /// Drop every cached record.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// store.clear();
    /// assert_eq!(store.cached(), 0);
    /// ```
    pub fn clear(&self) {
        self.table.clear();
    }

    /// How many records are cached now (expired ones included until they are looked up or
    /// evicted).
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// assert_eq!(store.cached(), 0);
    /// ```
    pub fn cached(&self) -> usize {
        self.table.len()
    }

    /// How many `begin` calls the cache answered, since the store was built.
    ///
    /// ```
    /// let store = idem_runtime::CachedStore::new(idem_runtime::MemoryStore::new());
    /// assert_eq!(store.hits(), 0);
    /// ```
    pub fn hits(&self) -> u64 {
        self.table.hits()
    }
}

impl<S: Store> CachedStoreBuilder<S> {
    /// The most records cached at once, in all (at least 1; default 10 000). Past it, the oldest
    /// go first (of the key's share of the cache: it is split in up to 16 shards).
    pub fn capacity(mut self, records: usize) -> Self {
        self.capacity = records.max(1);
        self
    }

    /// The most bytes of outputs cached at once, in all (default 64 MiB). Past it, the oldest go
    /// first. The cache is split in up to 16 shards, each with its share: an output larger than
    /// a share (`max_bytes / 16` with 16 or more records) is not cached.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Outputs larger than this are not cached (default 64 KiB).
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// The longest a record is served from the cache (default 60 s), even when its `keep` is
    /// longer: how long a record forgotten by another process may still be replayed here.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// Also cache the DONE records the store answers with (completed by another process), for
    /// `age` (bounded by [`max_age`](Self::max_age)). The store does not say how much of such a
    /// record's `keep` is left: choose `age` shorter than the shortest `keep` of the handlers
    /// using this store, or a record may be replayed after its `keep`. Off by default.
    pub fn learn_replays_for(mut self, age: Duration) -> Self {
        self.learn_for = Some(age);
        self
    }

    /// The store.
    pub fn build(self) -> CachedStore<S> {
        CachedStore {
            inner: Arc::new(self.inner),
            table: Arc::new(Table::new(self.capacity, self.max_bytes)),
            max_age: self.max_age,
            max_output: self.max_output,
            learn_for: self.learn_for.map(|age| age.min(self.max_age)),
        }
    }
}

/// `from + by`, or about a century later where that overflows (`Duration::MAX` is a valid `keep`
/// and `max_age`), or `from` (not cached at all) where even that does.
fn later(from: Instant, by: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    from.checked_add(by)
        .or_else(|| from.checked_add(CENTURY))
        .unwrap_or(from)
}

#[async_trait::async_trait]
impl<S: Store> Store for CachedStore<S> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        if let Some(hit) = self.table.get(req.scope, req.key, req.fingerprint) {
            return Ok(hit);
        }
        let epoch = self.table.epoch();
        let answer = self.inner.begin(req).await?;
        if let (
            Some(age),
            Begin::Completed {
                output,
                fingerprint,
            },
        ) = (self.learn_for, &answer)
            && output.len() <= self.max_output
        {
            self.table.insert(
                epoch,
                req.scope,
                req.key,
                output,
                *fingerprint,
                later(Instant::now(), age),
            );
        }
        Ok(answer)
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        // Before the call: the store's record lives until at least `sent + keep`.
        let sent = Instant::now();
        let epoch = self.table.epoch();
        // A retry of a mark that failed (its answer lost) is not cached: the store's record may
        // be the earlier attempt's, with its clock and its output.
        let first = self.table.marking(key, lease.token, sent, keep);
        self.inner.complete(scope, key, lease, output, keep).await?;
        if !self.table.marked(key, lease.token, first) {
            self.table.take(scope, key);
            return Ok(());
        }
        if output.len() <= self.max_output {
            let until = later(sent, keep.min(self.max_age).saturating_sub(CLOCK_MARGIN));
            self.table
                .insert(epoch, scope, key, output, lease.fingerprint, until);
        } else {
            // The key's record of before, if any, is not the store's any more.
            self.table.take(scope, key);
        }
        Ok(())
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(scope, key, lease).await
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.extend(scope, key, lease, ttl).await
    }

    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        self.inner.wait(scope, key, max).await
    }

    /// The store underneath's: a done mark the watchdog finishes in the background is not
    /// cached (the next duplicate asks the store).
    fn for_watchdog(&self) -> Arc<dyn Store> {
        self.inner.for_watchdog()
    }

    fn transactional(&self) -> Option<&dyn TxStore> {
        self.inner.transactional()
    }
}
