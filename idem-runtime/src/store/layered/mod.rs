//! The layered store: Redis in front, the database as the truth (see [`LayeredStore`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{Fingerprint, Key, StoreError};

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
/// The most leases whose fingerprint is remembered; beyond it, a completion does not write the
/// front (the next duplicate backfills it from the durable store instead).
const MAX_TRACKED: usize = 1 << 20;
const SHARDS: usize = 16;

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
///   still re-runs the handler after the lease expires: *at least once* for the effect.
/// - **`LayeredStore::run_in_tx`** (a SQL feature; the durable layer a `SqlStore`): the done
///   mark is written in the handler's own transaction: *exactly once in effect* for writes to
///   that database, with the front answering duplicates.
///
/// # Fingerprints and the front
///
/// A front record must not replay to a payload the durable record would refuse. So the layered
/// store keeps the fingerprint of each lease it hands out until it is completed: when the front
/// lost the claim while the handler ran, the done mark is written there only after claiming again
/// with the fingerprint (one more front round trip, for calls with a fingerprint). And a backfill
/// for a request without a fingerprint is written only after the durable store confirmed that its
/// record has none either (one more durable read, on that rare path only).
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
    gate: Gate,
    degraded: AtomicU64,
    front_failures: AtomicU64,
    leases: Leases,
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
                gate: Gate::new(),
                degraded: AtomicU64::new(0),
                front_failures: AtomicU64::new(0),
                leases: Leases::default(),
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

impl<F: Store, D: Store> LayeredStore<F, D> {
    /// Release `token`'s claim in the front in the background, quietly and bounded by the front
    /// timeout: the front was just seen failing, so this is a courtesy, not part of the answer.
    fn spawn_front_release(&self, scope: &str, key: &Key, token: Token) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, scope, key) = (self.clone(), scope.to_owned(), key.clone());
        runtime.spawn(async move {
            let lease = Lease { token, fence: 0 };
            let inner = &*store.inner;
            let release = inner.front.release(&scope, &key, &lease);
            if let Ok(Err(e)) | Err(e) = tokio::time::timeout(inner.cfg.front_timeout, release)
                .await
                .map_err(|_| StoreError::unavailable("timed out"))
            {
                tracing::debug!(scope, key = %key, error = %e, "front claim not released; it expires with its lease");
            }
        });
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
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// How many front calls failed or timed out since the store was built.
    pub fn front_failures(&self) -> u64 {
        self.inner.front_failures.load(Ordering::Relaxed)
    }

    /// Whether calls currently use the front (false from a front failure until a probe
    /// succeeds).
    pub fn front_available(&self) -> bool {
        self.inner.gate.down_until.load(Ordering::Acquire) == 0
    }
}

impl<F: Store, D: Store> Inner<F, D> {
    /// Run one front operation through the gate and the timeout. `Err`: the front did not
    /// answer (skipped, failed or timed out), and this operation counts as degraded.
    async fn front_op<T, Fut>(
        &self,
        op: &'static str,
        call: impl FnOnce() -> Fut,
    ) -> Result<Result<T, StoreError>, Missed>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let pass = self.gate.pass();
        if pass == Pass::Skip {
            self.degraded(op);
            return Err(Missed::Skipped);
        }
        // A probe that is cancelled must not leave the gate waiting for it forever.
        let _probe = (pass == Pass::Probe).then(|| ProbeGuard(&self.gate));
        let (missed, failure) = match tokio::time::timeout(self.cfg.front_timeout, call()).await {
            Ok(Err(StoreError::Unavailable(e))) => (Missed::Failed, e.to_string()),
            Err(_) => (
                Missed::Failed,
                format!("no answer within {:?}", self.cfg.front_timeout),
            ),
            Ok(answer) => {
                if pass == Pass::Probe {
                    self.gate.recovered();
                }
                return Ok(answer);
            }
        };
        self.front_failures.fetch_add(1, Ordering::Relaxed);
        self.gate.failed(pass, self.cfg.front_backoff, op, &failure);
        self.degraded(op);
        Err(missed)
    }

    fn degraded(&self, op: &'static str) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ::metrics::counter!("idem_store_degraded_total", "op" => op).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = op;
    }

    /// Release a claim this store holds in the front, best effort.
    async fn front_release(&self, scope: &str, key: &Key, lease: &Lease) {
        let released = self
            .front_op("release", || self.front.release(scope, key, lease))
            .await;
        if let Ok(Err(e)) = released {
            tracing::debug!(scope, key = %key, error = %e, "front release failed; its lease expires")
        }
    }

    /// Record a durable done mark in the front, so duplicates are answered there. `tracked` is
    /// what [`Leases::take`] knew of the lease: `None` when it does not know the lease's
    /// fingerprint, and then nothing is written (a record without its fingerprint could replay to
    /// a payload the durable record refuses); the front's claim is released instead.
    async fn front_mark(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
        tracked: Option<Option<Fingerprint>>,
    ) {
        let keep = keep.min(self.cfg.front_keep);
        let written = match tracked {
            None => return self.front_release(scope, key, lease).await,
            Some(None) => {
                self.front_op("complete", || {
                    self.front.complete(scope, key, lease, output, keep)
                })
                .await
            }
            // Claim again with the fingerprint first: if the front lost our claim meanwhile, a bare
            // complete would write a record without it.
            Some(Some(fp)) => {
                self.front_op("complete", || async move {
                    let again = BeginRequest {
                        scope,
                        key,
                        token: lease.token,
                        ttl: REBEGIN_TTL,
                        fingerprint: Some(fp),
                    };
                    match self.front.begin(&again).await? {
                        Begin::Acquired(_) => {
                            self.front.complete(scope, key, lease, output, keep).await
                        }
                        // Another caller holds the front's claim, or the front is done already.
                        _ => Ok(()),
                    }
                })
                .await
            }
        };
        if let Ok(Err(e)) = written {
            // LeaseLost: another caller claimed the front meanwhile; it will find the durable
            // record and backfill. Anything else: the front stays without the record.
            tracing::debug!(scope, key = %key, error = %e, "done mark not copied to the front");
        }
    }

    /// Begin in the durable store alone (the front is down or could not answer).
    async fn durable_begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let answer = self.durable.begin(req).await?;
        if let Begin::Acquired(lease) = &answer {
            self.leases.insert(lease.token, req.fingerprint);
        }
        Ok(answer)
    }

    /// The front claimed a key that the durable store has done: copy the record into the front
    /// (completing the front's claim), so the next duplicates are answered there.
    async fn backfill(&self, req: &BeginRequest<'_>, front: Lease, output: &[u8]) {
        let (scope, key) = (req.scope, req.key);
        // The front's claim carries the request's fingerprint, which the durable record accepted
        // (it has the same one, or none): a record with it replays to no payload the durable one
        // refuses. A request without one would give a record without one, which is right only if
        // the durable record has none either: ask it with a fingerprint nothing has.
        let safe = req.fingerprint.is_some()
            || {
                let probe = BeginRequest {
                    fingerprint: Some(Fingerprint(Token::generate().0.to_be_bytes())),
                    ..*req
                };
                match self.durable.begin(&probe).await {
                    Ok(Begin::Completed { .. }) => true,
                    // The record expired in between and the probe claimed the key: give it back.
                    Ok(Begin::Acquired(lease)) => {
                        if let Err(e) = self.durable.release(scope, key, &lease).await {
                            tracing::warn!(scope, key = %key, error = %e, "could not release a probe's claim; it expires with its lease");
                        }
                        false
                    }
                    Ok(Begin::Mismatch | Begin::InFlight { .. }) | Err(_) => false,
                }
            };
        if !safe {
            return self.front_release(scope, key, &front).await;
        }
        let keep = self.cfg.backfill_keep.min(self.cfg.front_keep);
        match self
            .front_op("complete", || {
                self.front.complete(scope, key, &front, output, keep)
            })
            .await
        {
            Ok(Ok(())) => {
                tracing::debug!(scope, key = %key, "front had lost a done record: backfilled")
            }
            Ok(Err(e)) => {
                tracing::debug!(scope, key = %key, error = %e, "front backfill failed")
            }
            Err(_) => {}
        }
    }
}

#[async_trait::async_trait]
impl<F: Store, D: Store> Store for LayeredStore<F, D> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let inner = &*self.inner;
        let front = match inner.front_op("begin", || inner.front.begin(req)).await {
            Ok(Ok(Begin::Acquired(lease))) => lease,
            // Replay, in flight, mismatch: the front's answer is enough.
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                // Corrupt (foreign data under the front's key): the durable record decides.
                tracing::warn!(scope = req.scope, key = %req.key, error = %e, "front could not answer begin; asking the durable store");
                inner.degraded("begin");
                return inner.durable_begin(req).await;
            }
            Err(Missed::Skipped) => return inner.durable_begin(req).await,
            Err(Missed::Failed) => {
                // A front call that failed or timed out may still have claimed the key: give it
                // back if the front answers soon, so it does not report the key in flight for a
                // whole ttl.
                self.spawn_front_release(req.scope, req.key, req.token);
                return inner.durable_begin(req).await;
            }
        };
        // If this call is dropped before the durable store answers, give the front's claim back.
        let mut claim = FrontClaim {
            front: &inner.front,
            req,
            lease: Some(front),
        };
        let durable = inner.durable.begin(req).await;
        claim.lease = None;
        match durable {
            Ok(Begin::Acquired(lease)) => {
                inner.leases.insert(lease.token, req.fingerprint);
                Ok(Begin::Acquired(lease))
            }
            Ok(Begin::Completed { output }) => {
                inner.backfill(req, front, &output).await;
                Ok(Begin::Completed { output })
            }
            // In flight elsewhere (e.g. claimed while the front was down), mismatch, or an error:
            // the durable answer stands, and the front must not keep a claim nobody runs.
            other => {
                inner.front_release(req.scope, req.key, &front).await;
                other
            }
        }
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
        match inner
            .durable
            .complete(scope, key, lease, output, keep)
            .await
        {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => {
                inner.leases.take(lease.token);
                return Err(StoreError::LeaseLost);
            }
            // Kept tracked: the wrapper retries `complete` with this lease.
            Err(e) => return Err(e),
        }
        let tracked = inner.leases.take(lease.token);
        inner
            .front_mark(scope, key, lease, output, keep, tracked)
            .await;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        let inner = &*self.inner;
        inner.leases.take(lease.token);
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
        let renewed = inner
            .front_op("extend", || inner.front.extend(scope, key, lease, ttl))
            .await;
        if let Ok(Err(StoreError::LeaseLost)) = renewed
            && let Some(fingerprint) = inner.leases.get(lease.token)
        {
            // The front lost our claim (flush, restart): claim it again, so in-flight duplicates
            // are refused by the front instead of each reaching the durable store.
            let again = BeginRequest {
                scope,
                key,
                token: lease.token,
                ttl,
                fingerprint,
            };
            let _ = inner.front_op("extend", || inner.front.begin(&again)).await;
        }
        Ok(())
    }

    fn release_detached(&self, scope: &str, key: &Key, lease: Lease) {
        self.inner.leases.take(lease.token);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // One task, durable first, as in `release`.
                let (store, scope, key) = (self.clone(), scope.to_owned(), key.clone());
                runtime.spawn(async move {
                    if let Err(e) = store.release(&scope, &key, &lease).await {
                        tracing::warn!(scope, key = %key, error = %e, "background release failed; the key frees when its lease expires");
                    }
                });
            }
            Err(_) => {
                self.inner.durable.release_detached(scope, key, lease);
                self.inner.front.release_detached(scope, key, lease);
            }
        }
    }

    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        // The front signals completions; while it is down, the durable store's wait.
        if self.front_available() {
            self.inner.front.wait(scope, key, max).await
        } else {
            self.inner.durable.wait(scope, key, max).await
        }
    }
}

// ---- The transactional mode, with a SQL store as the durable layer ----

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
impl<F: Store, DB: crate::sql::Backend> LayeredStore<F, crate::SqlStore<DB>> {
    /// [`SqlStore::run_in_tx`](crate::SqlStore::run_in_tx) behind the front: **exactly once in
    /// effect** for the writes `handler` makes in the transaction it is given, with duplicates
    /// answered by the front.
    ///
    /// The key is claimed like [`begin`](Store::begin) does (front, then the database with the
    /// same token; a duplicate of a done key is replayed by the front alone). Then a transaction
    /// begins on the SQL store's pool and `handler` runs in it; on `Ok(v)` the done mark (with `v`)
    /// is written **in that transaction**, token-checked, and the transaction commits: the effect
    /// and the mark commit together or not at all. After the commit the front gets the done mark
    /// (best effort: if it fails, the next duplicate finds the database's record and backfills
    /// it). On `Err`, a panic or cancellation the transaction rolls back and the key is released
    /// in both layers. The outcomes mean what they mean for `SqlStore::run_in_tx`.
    ///
    /// ```no_run
    /// # #[cfg(all(feature = "redis", feature = "postgres"))]
    /// # async fn demo(store: idem_runtime::LayeredStore<idem_runtime::RedisStore, idem_runtime::PgStore>) {
    /// use idem_runtime::{Call, Options, sqlx};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error(transparent)]
    ///     Idem(#[from] idem_runtime::Error),
    ///     #[error(transparent)]
    ///     Db(#[from] sqlx::Error),
    /// }
    ///
    /// let opts = Options::new("coupons::issue");
    /// let code: Result<String, AppError> = store
    ///     .run_in_tx(&opts, Call::new("order-7"), |tx| Box::pin(async move {
    ///         sqlx::query("INSERT INTO coupons (order_id, code) VALUES ('order-7', 'C-1')")
    ///             .execute(&mut **tx)
    ///             .await?;
    ///         Ok("C-1".to_string())
    ///     }))
    ///     .await;
    /// # let _ = code;
    /// # }
    /// ```
    pub async fn run_in_tx<R, H>(&self, opts: &crate::Options, call: crate::Call, handler: H) -> R
    where
        R: crate::Outcome,
        R::Ok: crate::Replayable,
        R::Err: crate::AbsorbsIdemError,
        H: for<'t> FnOnce(&'t mut sqlx::Transaction<'static, DB>) -> crate::sql::TxFuture<'t, R>,
    {
        use crate::Error;
        use crate::sql::fail;

        let key = call.key().ok().cloned();
        let body = move |lease: Lease| async move {
            let scope = opts.scope_str();
            let Some(key) = key else {
                // `execute` refuses an invalid key before it calls the handler.
                return fail(Error::InvalidKey {
                    reason: "the key is empty",
                });
            };
            let (value, output) = match self
                .durable()
                .transact(None, opts, &key, &lease, handler)
                .await
            {
                Ok(done) => done,
                Err(failed) => return failed,
            };
            let tracked = self.inner.leases.take(lease.token);
            self.inner
                .front_mark(scope, &key, &lease, &output, opts.keep, tracked)
                .await;
            R::from_result(Ok(value))
        };
        crate::run::execute(self, opts, call, crate::run::Marking::ByHandler, body).await
    }
}

/// The front's claim, released in the background if `begin` is dropped before the durable store
/// answered.
struct FrontClaim<'a, F: Store> {
    front: &'a F,
    req: &'a BeginRequest<'a>,
    lease: Option<Lease>,
}

impl<F: Store> Drop for FrontClaim<'_, F> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.front
                .release_detached(self.req.scope, self.req.key, lease);
        }
    }
}

// ---- The front's health ----

/// Why a front operation has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missed {
    /// The front is in its back-off: not called.
    Skipped,
    /// Called, and it failed or timed out (it may still have done the work).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The front is healthy.
    Use,
    /// The front failed and its back-off is over: this call tries it for everyone.
    Probe,
    /// The front failed recently: do not call it.
    Skip,
}

/// Whether calls use the front. Lock-free: one atomic load on the healthy path.
struct Gate {
    epoch: Instant,
    /// 0 while the front is healthy; otherwise the end of its back-off, in nanoseconds since
    /// `epoch` (at least 1).
    down_until: AtomicU64,
    /// Set while one call probes the front, so a dead front costs one timeout per back-off, not
    /// one per call.
    probing: AtomicBool,
    /// When the last warning was logged (ns since `epoch`, +1), and how many were held back.
    last_warn: AtomicU64,
    held_back: AtomicU64,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            epoch: Instant::now(),
            down_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            last_warn: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn pass(&self) -> Pass {
        let until = self.down_until.load(Ordering::Acquire);
        if until == 0 {
            return Pass::Use;
        }
        if self.now() < until {
            return Pass::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Pass::Probe,
            Err(_) => Pass::Skip,
        }
    }

    fn failed(&self, pass: Pass, backoff: Duration, op: &str, error: &str) {
        let until = self
            .now()
            .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        match pass {
            Pass::Probe => {
                self.down_until.store(until, Ordering::Release);
                self.probing.store(false, Ordering::Release);
            }
            // Only the first failure of an outage moves the gate: concurrent failures must not
            // push the probe further out.
            _ => {
                let _ =
                    self.down_until
                        .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        self.warn(op, error, backoff);
    }

    fn recovered(&self) {
        self.down_until.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        tracing::info!("idempotency front store answers again: back on the fast path");
    }

    /// Warn at most once per [`LOG_EVERY`], saying how many warnings were held back meanwhile.
    fn warn(&self, op: &str, error: &str, backoff: Duration) {
        let now = self.now();
        let last = self.last_warn.load(Ordering::Acquire);
        let due = last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_nanos() as u64;
        if due
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let held_back = self.held_back.swap(0, Ordering::AcqRel);
            tracing::warn!(
                op,
                error,
                ?backoff,
                held_back,
                "idempotency front store unavailable: answering from the durable store alone (degraded); retrying the front after the back-off"
            );
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Ends a probe however the probing call ends (including cancellation).
struct ProbeGuard<'a>(&'a Gate);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

// ---- Fingerprints of the leases handed out ----

/// The fingerprint of each lease this store handed out, until it is completed or released, so a
/// front record written later carries it (see the module docs).
/// Token → the fingerprint of its request.
type LeaseMap = HashMap<u128, Option<Fingerprint>>;

struct Leases {
    shards: Box<[Mutex<LeaseMap>]>,
    len: AtomicUsize,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
        }
    }
}

impl Leases {
    fn shard(&self, token: Token) -> std::sync::MutexGuard<'_, LeaseMap> {
        // The low half of a token is a per-process counter: consecutive leases spread evenly. A
        // panic while holding the lock cannot leave the map half-updated: keep using it.
        self.shards[(token.0 as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, token: Token, fingerprint: Option<Fingerprint>) {
        if self.len.load(Ordering::Relaxed) >= MAX_TRACKED {
            return;
        }
        if self.shard(token).insert(token.0, fingerprint).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Some(fingerprint)` when the lease is known.
    fn get(&self, token: Token) -> Option<Option<Fingerprint>> {
        self.shard(token).get(&token.0).copied()
    }

    fn take(&self, token: Token) -> Option<Option<Fingerprint>> {
        let taken = self.shard(token).remove(&token.0);
        if taken.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Call, Error, MemoryStore, Options, run};
    use std::sync::atomic::AtomicU32;

    /// A front whose faults the test controls: it can lose everything (a Redis flush or
    /// restart), fail every call (Redis down), or never answer (a network partition). Underneath
    /// it is a real `MemoryStore`.
    #[derive(Clone, Default)]
    struct Front(Arc<FrontState>);

    #[derive(Default)]
    struct FrontState {
        store: Mutex<MemoryStore>,
        down: AtomicBool,
        hang: AtomicBool,
        calls: AtomicU64,
    }

    impl Front {
        fn flush(&self) {
            *self.0.store.lock().unwrap() = MemoryStore::new();
        }
        fn len(&self) -> usize {
            self.0.store.lock().unwrap().len()
        }
        fn set_down(&self, down: bool) {
            self.0.down.store(down, Ordering::SeqCst);
        }
        fn calls(&self) -> u64 {
            self.0.calls.load(Ordering::SeqCst)
        }
        async fn reach(&self) -> Result<MemoryStore, StoreError> {
            self.0.calls.fetch_add(1, Ordering::SeqCst);
            if self.0.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.0.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable(std::io::Error::other(
                    "connection refused",
                )));
            }
            Ok(self.0.store.lock().unwrap().clone())
        }
    }

    #[async_trait::async_trait]
    impl Store for Front {
        async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
            self.reach().await?.begin(req).await
        }
        async fn complete(
            &self,
            scope: &str,
            key: &Key,
            lease: &Lease,
            output: &[u8],
            keep: Duration,
        ) -> Result<(), StoreError> {
            self.reach()
                .await?
                .complete(scope, key, lease, output, keep)
                .await
        }
        async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
            self.reach().await?.release(scope, key, lease).await
        }
        async fn extend(
            &self,
            scope: &str,
            key: &Key,
            lease: &Lease,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.reach().await?.extend(scope, key, lease, ttl).await
        }
    }

    /// A durable store that can fail every call.
    #[derive(Clone, Default)]
    struct Durable {
        store: MemoryStore,
        down: Arc<AtomicBool>,
    }

    impl Durable {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable(std::io::Error::other(
                    "database down",
                )));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Store for Durable {
        async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
            self.check()?;
            self.store.begin(req).await
        }
        async fn complete(
            &self,
            scope: &str,
            key: &Key,
            lease: &Lease,
            output: &[u8],
            keep: Duration,
        ) -> Result<(), StoreError> {
            self.check()?;
            self.store.complete(scope, key, lease, output, keep).await
        }
        async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
            self.check()?;
            self.store.release(scope, key, lease).await
        }
        async fn extend(
            &self,
            scope: &str,
            key: &Key,
            lease: &Lease,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.check()?;
            self.store.extend(scope, key, lease, ttl).await
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    fn req<'a>(key: &'a Key, fingerprint: Option<Fingerprint>) -> BeginRequest<'a> {
        BeginRequest {
            scope: "s",
            key,
            token: Token::generate(),
            ttl: LONG,
            fingerprint,
        }
    }

    fn fp(text: &str) -> Fingerprint {
        Fingerprint::builder().add(&text).finish()
    }

    fn layered(front: &Front, durable: &Durable) -> LayeredStore<Front, Durable> {
        LayeredStore::builder(front.clone(), durable.clone())
            .front_timeout(Duration::from_millis(50))
            .front_backoff(Duration::from_millis(100))
            .build()
    }

    async fn done(store: &impl Store, key: &Key, fingerprint: Option<Fingerprint>, out: &[u8]) {
        let Begin::Acquired(lease) = store.begin(&req(key, fingerprint)).await.unwrap() else {
            panic!("expected Acquired")
        };
        store.complete("s", key, &lease, out, LONG).await.unwrap();
    }

    #[tokio::test]
    async fn duplicates_are_answered_by_the_front_alone() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        done(&store, &k, None, b"out").await;
        durable.down.store(true, Ordering::SeqCst);
        assert_eq!(
            store.begin(&req(&k, None)).await.unwrap(),
            Begin::Completed {
                output: b"out".to_vec()
            }
        );
    }

    #[tokio::test]
    async fn a_front_that_lost_a_record_is_backfilled_from_the_durable_store() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        done(&store, &k, None, b"out").await;
        front.flush();
        let replay = Begin::Completed {
            output: b"out".to_vec(),
        };
        assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
        assert_eq!(front.len(), 1, "backfilled");
        durable.down.store(true, Ordering::SeqCst);
        assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
    }

    #[tokio::test]
    async fn a_backfill_never_drops_the_fingerprint_check() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        done(&store, &k, Some(fp("a")), b"out").await;
        let replay = Begin::Completed {
            output: b"out".to_vec(),
        };
        // Without a fingerprint: replayed, but the front is not given a record without one.
        front.flush();
        assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
        assert_eq!(front.len(), 0);
        assert_eq!(
            store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
            Begin::Mismatch
        );
        // With the right one: backfilled with it, so another payload is still refused.
        assert_eq!(store.begin(&req(&k, Some(fp("a")))).await.unwrap(), replay);
        assert_eq!(front.len(), 1);
        durable.down.store(true, Ordering::SeqCst);
        assert_eq!(
            store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
            Begin::Mismatch
        );
        assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
    }

    #[tokio::test]
    async fn a_completion_after_a_flush_keeps_the_fingerprint() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        let Begin::Acquired(lease) = store.begin(&req(&k, Some(fp("a")))).await.unwrap() else {
            panic!()
        };
        front.flush(); // while the handler runs
        store.complete("s", &k, &lease, b"out", LONG).await.unwrap();
        durable.down.store(true, Ordering::SeqCst);
        assert_eq!(
            store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
            Begin::Mismatch
        );
    }

    #[tokio::test]
    async fn in_flight_in_the_durable_store_wins_over_an_empty_front() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        let Begin::Acquired(held) = store.begin(&req(&k, None)).await.unwrap() else {
            panic!()
        };
        front.flush();
        assert!(matches!(
            store.begin(&req(&k, None)).await.unwrap(),
            Begin::InFlight { .. }
        ));
        assert_eq!(front.len(), 0, "the front's claim was given back");
        // An extend puts the holder's claim back into the front.
        store.extend("s", &k, &held, LONG).await.unwrap();
        assert_eq!(front.len(), 1);
    }

    #[tokio::test]
    async fn the_lease_carries_the_durable_fence() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        // Move the front's fence counter away from the durable one's.
        for i in 0..5 {
            let other = Key::new(&i).unwrap();
            front.begin(&req(&other, None)).await.unwrap();
        }
        let r = req(&k, None);
        let Begin::Acquired(lease) = store.begin(&r).await.unwrap() else {
            panic!()
        };
        // A retry with the same token answers each store's own lease.
        let Begin::Acquired(in_front) = front.begin(&r).await.unwrap() else {
            panic!()
        };
        assert_ne!(in_front.fence, lease.fence);
        assert_eq!(
            durable.store.begin(&r).await.unwrap(),
            Begin::Acquired(lease)
        );
        assert_eq!(store.begin(&r).await.unwrap(), Begin::Acquired(lease));
    }

    #[tokio::test]
    async fn a_durable_failure_fails_closed_and_frees_the_front() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        durable.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            store.begin(&req(&k, None)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(front.len(), 0);
        let runs = AtomicU32::new(0);
        let out: Result<u32, Error> = run(&store, &Options::new("s"), Call::new("k"), || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(1)
        })
        .await;
        assert!(matches!(out, Err(Error::Unavailable { .. })), "{out:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn complete_reports_the_durable_answer() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let k = Key::new("k").unwrap();
        let Begin::Acquired(lease) = store.begin(&req(&k, None)).await.unwrap() else {
            panic!()
        };
        durable.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            store.complete("s", &k, &lease, b"x", LONG).await,
            Err(StoreError::Unavailable(_))
        ));
        durable.down.store(false, Ordering::SeqCst);
        // The retry succeeds and the front learns the record.
        store.complete("s", &k, &lease, b"x", LONG).await.unwrap();
        durable.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            store.begin(&req(&k, None)).await.unwrap(),
            Begin::Completed { .. }
        ));
    }

    #[tokio::test]
    async fn a_dead_front_degrades_to_the_durable_store_and_recovers() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = layered(&front, &durable);
        let opts = Options::new("s");
        let runs = AtomicU32::new(0);
        let call = |k: u32| {
            let runs = &runs;
            run(&store, &opts, Call::new(&k), move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(k)
            })
        };
        assert_eq!(call(1).await.unwrap(), 1);
        front.set_down(true);
        for _ in 0..2 {
            for k in 1..20 {
                assert_eq!(call(k).await.unwrap(), k);
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), 19, "each key ran once");
        assert!(store.degraded_calls() > 19);
        assert!(!store.front_available());
        // While it is down the front is skipped, not called per call.
        assert!(front.calls() < 10, "front called {} times", front.calls());

        front.set_down(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.front_available() {
            assert!(Instant::now() < deadline, "never went back to the front");
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(call(1).await.unwrap(), 1);
        }
        let degraded = store.degraded_calls();
        for k in 1..40 {
            assert_eq!(call(k).await.unwrap(), k);
        }
        assert_eq!(store.degraded_calls(), degraded);
        assert_eq!(runs.load(Ordering::SeqCst), 39);
        // Keys done while the front was down were backfilled, and replay from the front now.
        assert!(front.len() >= 39);
        durable.down.store(true, Ordering::SeqCst);
        assert_eq!(call(5).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_front_that_hangs_costs_one_timeout_not_one_per_call() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = LayeredStore::builder(front.clone(), durable.clone())
            .front_timeout(Duration::from_millis(100))
            .front_backoff(Duration::from_secs(60))
            .build();
        front.0.hang.store(true, Ordering::SeqCst);
        let opts = Options::new("s");
        let started = Instant::now();
        for k in 0..50u32 {
            let out: Result<u32, Error> =
                run(&store, &opts, Call::new(&k), || async { Ok(k) }).await;
            assert_eq!(out.unwrap(), k);
        }
        // One timeout (the first call), then the front is skipped.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(store.front_failures(), 1);
    }

    #[tokio::test]
    async fn a_cancelled_probe_does_not_stop_the_probing() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = LayeredStore::builder(front.clone(), durable.clone())
            .front_timeout(Duration::from_secs(30))
            .front_backoff(Duration::from_millis(20))
            .build();
        let k = Key::new("k").unwrap();
        front.set_down(true);
        store.begin(&req(&k, None)).await.unwrap();
        assert!(!store.front_available());
        // The front hangs now; the probe that finds it so is cancelled by its caller.
        front.set_down(false);
        front.0.hang.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in 0.. {
            assert!(Instant::now() < deadline, "never probed");
            let other = Key::new(&n).unwrap();
            let r = req(&other, None);
            if tokio::time::timeout(Duration::from_millis(50), store.begin(&r))
                .await
                .is_err()
            {
                break; // this call was the probe, stuck in the front, and is now cancelled
            }
        }
        front.0.hang.store(false, Ordering::SeqCst);
        while !store.front_available() {
            assert!(Instant::now() < deadline, "never probed again");
            tokio::time::sleep(Duration::from_millis(5)).await;
            store.begin(&req(&k, None)).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_call_probes_while_the_others_skip_the_front() {
        let (front, durable) = (Front::default(), Durable::default());
        let store = LayeredStore::builder(front.clone(), durable.clone())
            .front_timeout(Duration::from_millis(300))
            .front_backoff(Duration::from_millis(20))
            .build();
        front.set_down(true);
        store
            .begin(&req(&Key::new("k").unwrap(), None))
            .await
            .unwrap();
        assert_eq!(store.front_failures(), 1);
        front.set_down(false);
        front.0.hang.store(true, Ordering::SeqCst);
        // Let the back-off pass (the gate has no signal to wait for: its clock decides).
        tokio::time::sleep(Duration::from_millis(40)).await;
        let calls: Vec<_> = (0..16)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let k = Key::new(&n).unwrap();
                    store.begin(&req(&k, None)).await.unwrap()
                })
            })
            .collect();
        for c in calls {
            assert!(matches!(c.await.unwrap(), Begin::Acquired(_)));
        }
        assert_eq!(
            store.front_failures(),
            2,
            "more than one call probed the front"
        );
    }

    #[tokio::test]
    async fn memory_front_wait_is_signalled() {
        // The in-flight duplicate waits on the front's signal and replays the holder's output.
        let store = LayeredStore::new(MemoryStore::new(), MemoryStore::new());
        let opts = Options::new("s").wait(Duration::from_secs(10));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let first = run(&store, &opts, Call::new("k"), || async {
            let _ = started_tx.send(());
            let _ = finish_rx.await;
            Ok::<_, Error>(1u32)
        });
        let second = async {
            started_rx.await.unwrap();
            let dup = run(&store, &opts, Call::new("k"), || async {
                Ok::<_, Error>(2u32)
            });
            let _ = finish_tx.send(());
            dup.await
        };
        let (a, b) = tokio::join!(first, second);
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    }
}
