//! The layered store: Redis in front, the database as the truth (see [`LayeredStore`]).
//!
//! The pieces: this file holds the type, its settings and the [`Store`] answers; `front.rs` the
//! calls to the front (claim, backfill, copy of done marks); `gate.rs` the front's health (skip,
//! probe, recover); `tx.rs` the transactional mode.

mod front;
mod gate;
mod ops;
#[cfg(test)]
mod tests;
mod tx;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{Key, StoreError};
use gate::Gate;

/// How long a front record written by [`Store::complete`] is kept at most (the durable record
/// keeps the `keep` it was given).
const DEFAULT_FRONT_KEEP: Duration = Duration::from_secs(3600);
/// How long a record copied back from the durable store into the front is kept.
const DEFAULT_BACKFILL_KEEP: Duration = Duration::from_secs(5);
/// The longest a front call may take before the front counts as down.
const DEFAULT_FRONT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long the front is skipped after it failed, before one call probes it again.
const DEFAULT_FRONT_BACKOFF: Duration = Duration::from_secs(1);
/// Degradation warnings are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The lease of the front claim that `complete` re-creates to restore a lost fingerprint; the
/// claim is completed at once, so this only bounds how long a failed completion blocks.
const REBEGIN_TTL: Duration = Duration::from_secs(5);
/// How long a front claim that could not be released (the front did not answer) is released
/// again, from the watchdog's thread, before it is left to expire with its lease.
const FRONT_RELEASE_RETRIES_FOR: Duration = Duration::from_secs(10);
/// How long the front's claim is kept after a transactional handler's done mark was written in a
/// transaction the caller has yet to commit: the front cannot be told the key is done before that
/// commit, so it answers in flight for this long, then the database answers (and backfills it).
const SETTLE: Duration = Duration::from_secs(1);

/// A fast store in front of a durable one: duplicates and in-flight conflicts are answered by the
/// front (Redis), and every claim that runs a handler is also a claim in the durable store (the
/// database's unique key), which stays the truth when the front loses data or is down. This is
/// the articles' conclusion, "Redis lock + database unique key as the fallback", made real.
///
/// # Who answers what
///
/// Both layers get the same token (the one of the [`BeginRequest`]); the lease handed to the
/// caller carries the **durable** store's fence, so downstream fencing follows the durable order.
///
/// | call | front (fast) | durable (the truth) |
/// |---|---|---|
/// | `begin` | asked first: `Completed` (replay), `InFlight` and `Mismatch` are answered from it alone | asked only when the front answered `Acquired`: its answer is the one returned. When it is `Completed` (the front lost the record: flush, restart, failover) the front is backfilled with the output; otherwise the front's claim is released |
/// | `complete` | written after the durable mark succeeded, best effort | written first; its answer (`LeaseLost`, errors) is returned |
/// | `release`, `extend` | best effort | decides the answer |
/// | `wait` | the front's signal | (the durable store's while the front is down) |
///
/// So a duplicate of a completed key costs one front round trip, and an in-flight duplicate too.
/// A key the front forgot costs a durable read once, then the front answers again. Every claim
/// that runs a handler is a claim in the durable store: when the front loses its data, the durable
/// unique key still lets exactly one caller in.
///
/// # When the front is down
///
/// A front call that fails with [`StoreError::Unavailable`] or takes longer than
/// [`front_timeout`](LayeredStoreBuilder::front_timeout) **degrades** the store: the call is
/// answered by the durable store alone, and for [`front_backoff`](LayeredStoreBuilder::front_backoff)
/// every call skips the front (no per-call timeout while it is down). Then one call probes the
/// front again; when it answers, all calls use it again, without restarting anything. Degraded
/// operations are counted ([`LayeredStore::degraded_calls`], and `idem_store_degraded_total{op}`
/// with the `metrics` feature) and logged with `tracing::warn!` at most once per 10 s.
///
/// A durable-store error is never hidden: it is returned as it is, so the wrapper fails closed
/// (the handler does not run without a durable claim).
///
/// # Guarantees
///
/// - **[`run`](crate::run) / `#[idempotent]`** on a layered store: at most one holder at a time per
///   key, and no second run after a success is recorded, even when the front loses its data (the
///   durable record answers). A crash between the handler's effect and the durable done mark
///   still re-runs the handler after the lease expires: *at least once* for the effect, about as
///   often as with a hand-written Redis lock (see the README's table of modes).
/// - **The transactional form** (`#[idempotent(tx = "...")]`, [`LayeredStore::run_in_tx`]; the
///   durable layer a `SqlStore`): the done mark is written in the handler's own transaction:
///   *exactly once in effect* for writes to that database, with the front answering duplicates.
///   While the caller has yet to commit, the front cannot know the key is done: it answers in
///   flight for up to a second after the handler returned, then the database answers.
///
/// # Fingerprints and the front
///
/// A front record must answer as the durable record would: replay to the payloads it replays
/// to, refuse the ones it refuses. Every lease carries the fingerprint it was taken with: when
/// the front lost the claim while the handler ran, the done mark is written there only after
/// claiming again with it (one more front round trip, for calls with a fingerprint). A backfill
/// copies the durable record's own fingerprint (the durable answer carries it), never the
/// request's.
///
/// # Transactions and the front
///
/// Nothing read inside the caller's transaction reaches the front before that transaction
/// commits: a done record the database answers there may be the caller's own uncommitted mark
/// (a second call of one key in one transaction), so it is replayed to the caller but not copied
/// to the front, and no call waits on another connection for the transaction it runs in.
///
/// # Limits
///
/// - A front claim that could not be completed or released in the front (the front was being
///   skipped when the handler finished) answers `InFlight` to duplicates until its lease ttl
///   lapses; then the durable record answers and is backfilled. Safe, but slower to replay for
///   the keys that were in flight when the front went away.
/// - The front can replay a record up to [`backfill_keep`](LayeredStoreBuilder::backfill_keep)
///   after the durable record's `keep` ran out (the durable answer does not say how much is left).
/// - A front flush that lands between the two front calls of one completion (claim again, then
///   complete) can leave a front record without its fingerprint.
///
/// Cloning is cheap; clones share the stores and the counters.
///
/// ```
/// use idem_runtime::{Call, LayeredStore, MemoryStore, Options, run};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let durable = MemoryStore::new(); // in production: a SqlStore
/// let store = LayeredStore::new(MemoryStore::new(), durable.clone());
/// let opts = Options::new("coupons");
/// let first: Result<u32, idem_runtime::Error> =
///     run(&store, &opts, Call::new("order-1"), || async { Ok(7) }).await;
///
/// // The front lost everything (a Redis restart): the durable record still answers.
/// let restarted = LayeredStore::new(MemoryStore::new(), durable);
/// let again: Result<u32, idem_runtime::Error> =
///     run(&restarted, &opts, Call::new("order-1"), || async { Ok(8) }).await;
/// assert_eq!((first.unwrap(), again.unwrap()), (7, 7));
/// # });
/// ```
///
/// With Redis and PostgreSQL:
///
/// ```no_run
/// # #[cfg(all(feature = "redis", feature = "postgres"))]
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::{LayeredStore, RedisStore, SqlStore};
/// use std::time::Duration;
///
/// let pool = idem_runtime::sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
/// let durable = SqlStore::new(pool);
/// durable.migrate().await?;
/// let front = RedisStore::from_url("redis://127.0.0.1:6379").await?;
/// let store = LayeredStore::builder(front, durable)
///     .front_timeout(Duration::from_millis(100))
///     .build();
/// idem_runtime::install_default_store(store)?;
/// # Ok(())
/// # }
/// ```
pub struct LayeredStore<F, D> {
    inner: Arc<Inner<F, D>>,
}

struct Inner<F, D> {
    front: F,
    durable: D,
    cfg: Config,
    /// Shared with the store the watchdog's thread uses, so both see the front's health.
    health: Arc<Health>,
    /// This store for the watchdog's thread (see [`Store::for_watchdog`]), built on first use.
    twin: OnceLock<Twin>,
}

/// Whether calls use the front, and the counts of what went without it.
struct Health {
    gate: Gate,
    degraded: AtomicU64,
    front_failures: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    front_keep: Duration,
    backfill_keep: Duration,
    front_timeout: Duration,
    front_backoff: Duration,
}

impl<F, D> Clone for LayeredStore<F, D> {
    fn clone(&self) -> Self {
        LayeredStore {
            inner: self.inner.clone(),
        }
    }
}

impl<F, D> fmt::Debug for LayeredStore<F, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayeredStore")
            .field("front", &std::any::type_name::<F>())
            .field("durable", &std::any::type_name::<D>())
            .field("config", &self.inner.cfg)
            .field("front_available", &self.front_available())
            .field("degraded_calls", &self.degraded_calls())
            .finish_non_exhaustive()
    }
}

/// Builds a [`LayeredStore`] with settings of your choice.
///
/// ```
/// use idem_runtime::{LayeredStore, MemoryStore};
/// use std::time::Duration;
///
/// let store = LayeredStore::builder(MemoryStore::new(), MemoryStore::new())
///     .front_keep(Duration::from_secs(600))
///     .backfill_keep(Duration::from_secs(10))
///     .front_timeout(Duration::from_millis(50))
///     .front_backoff(Duration::from_secs(2))
///     .build();
/// assert!(store.front_available());
/// ```
pub struct LayeredStoreBuilder<F, D> {
    front: F,
    durable: D,
    cfg: Config,
}

impl<F, D> fmt::Debug for LayeredStoreBuilder<F, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayeredStoreBuilder")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<F: Store, D: Store> LayeredStoreBuilder<F, D> {
    /// The longest a done record is kept in the front (default 1 h); the front keeps
    /// `min(keep, front_keep)`, the durable store the whole `keep`. Duplicates that arrive later
    /// are answered by the durable store (and backfill the front).
    pub fn front_keep(mut self, keep: Duration) -> Self {
        self.cfg.front_keep = keep;
        self
    }

    /// How long a record copied from the durable store back into the front is kept there
    /// (default 5 s, at most `front_keep`). The durable answer does not say how much of its `keep`
    /// is left, so this bounds how long the front can replay a record after the durable one
    /// expired. Longer absorbs more duplicates per durable read after the front lost its data.
    pub fn backfill_keep(mut self, keep: Duration) -> Self {
        self.cfg.backfill_keep = keep;
        self
    }

    /// The longest one front call may take (default 200 ms). A slower call counts as a front
    /// failure: the call is answered by the durable store alone and the front is skipped for
    /// [`front_backoff`](Self::front_backoff).
    pub fn front_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.front_timeout = timeout;
        self
    }

    /// How long the front is skipped after it failed (default 1 s); then one call probes it, and
    /// when it answers every call uses it again.
    pub fn front_backoff(mut self, backoff: Duration) -> Self {
        self.cfg.front_backoff = backoff;
        self
    }

    /// The store.
    pub fn build(self) -> LayeredStore<F, D> {
        LayeredStore {
            inner: Arc::new(Inner {
                front: self.front,
                durable: self.durable,
                cfg: self.cfg,
                health: Arc::new(Health {
                    gate: Gate::new(),
                    degraded: AtomicU64::new(0),
                    front_failures: AtomicU64::new(0),
                }),
                twin: OnceLock::new(),
            }),
        }
    }
}

impl<F: Store, D: Store> LayeredStore<F, D> {
    /// `front` answers duplicates, `durable` is the truth; default settings (see
    /// [`LayeredStoreBuilder`]).
    ///
    /// ```
    /// let store = idem_runtime::LayeredStore::new(
    ///     idem_runtime::MemoryStore::new(),
    ///     idem_runtime::MemoryStore::new(),
    /// );
    /// assert_eq!(store.degraded_calls(), 0);
    /// ```
    pub fn new(front: F, durable: D) -> Self {
        Self::builder(front, durable).build()
    }

    /// A builder, to change the front's keep, timeout and back-off.
    pub fn builder(front: F, durable: D) -> LayeredStoreBuilder<F, D> {
        LayeredStoreBuilder {
            front,
            durable,
            cfg: Config {
                front_keep: DEFAULT_FRONT_KEEP,
                backfill_keep: DEFAULT_BACKFILL_KEEP,
                front_timeout: DEFAULT_FRONT_TIMEOUT,
                front_backoff: DEFAULT_FRONT_BACKOFF,
            },
        }
    }
}

/// A layered store over the stores the watchdog's thread uses.
pub(crate) type Twin = LayeredStore<Arc<dyn Store>, Arc<dyn Store>>;

impl<F: Store, D: Store> LayeredStore<F, D> {
    /// This store for the watchdog's thread, built on first use (see [`Store::for_watchdog`]).
    fn twin(&self) -> &Twin {
        self.inner.twin.get_or_init(|| LayeredStore {
            inner: Arc::new(Inner {
                front: self.inner.front.for_watchdog(),
                durable: self.inner.durable.for_watchdog(),
                cfg: self.inner.cfg,
                health: self.inner.health.clone(),
                twin: OnceLock::new(),
            }),
        })
    }
}

impl<F, D> LayeredStore<F, D> {
    /// The front store.
    pub fn front(&self) -> &F {
        &self.inner.front
    }

    /// The durable store.
    pub fn durable(&self) -> &D {
        &self.inner.durable
    }

    /// How many store operations were answered without the front (it failed, timed out, or was
    /// being skipped after a failure) since the store was built. It stops increasing once the
    /// front is back.
    pub fn degraded_calls(&self) -> u64 {
        self.inner.health.degraded.load(Ordering::Relaxed)
    }

    /// How many front calls failed or timed out since the store was built.
    pub fn front_failures(&self) -> u64 {
        self.inner.health.front_failures.load(Ordering::Relaxed)
    }

    /// Whether calls currently use the front (false from a front failure until a probe
    /// succeeds).
    pub fn front_available(&self) -> bool {
        self.inner.health.gate.down_until.load(Ordering::Acquire) == 0
    }
}

#[async_trait::async_trait]
impl<F: Store, D: Store> Store for LayeredStore<F, D> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let durable = &self.inner.durable;
        self.inner
            .begin_via(req, false, || durable.begin(req))
            .await
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        // The durable mark decides; the front gets a copy so it can answer duplicates.
        inner
            .durable
            .complete(scope, key, lease, output, keep)
            .await?;
        inner.front_mark(scope, key, lease, output, keep).await;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        let inner = &*self.inner;
        // Durable first: once the front says the key is free, the durable store agrees.
        let answer = inner.durable.release(scope, key, lease).await;
        inner.front_release(scope, key, lease).await;
        answer
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner.durable.extend(scope, key, lease, ttl).await?;
        inner.front_extend(scope, key, lease, ttl).await;
        Ok(())
    }

    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        // The front signals completions; while it is down, the durable store's wait.
        if self.front_available() {
            self.inner.front.wait(scope, key, max).await
        } else {
            self.inner.durable.wait(scope, key, max).await
        }
    }

    /// The front's and the durable store's own stores for the watchdog's thread, behind the same
    /// gate and counters as this store.
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.twin().clone())
    }

    fn transactional(&self) -> Option<&dyn TxStore> {
        self.inner
            .durable
            .transactional()
            .map(|_| self as &dyn TxStore)
    }
}
