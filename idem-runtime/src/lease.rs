//! The lease a running handler holds ([`current_lease`]), and the watchdog that renews it.
//!
//! # The watchdog runs on a thread of its own
//!
//! Leases are renewed by one thread per process, `idem-watchdog`, which runs a small tokio
//! runtime of its own and talks to the stores through connections it opened itself
//! ([`Store::for_watchdog`]). So renewal does not depend on the handler yielding, nor on the
//! application's runtime making progress at all: a handler that blocks its thread (synchronous
//! I/O, CPU work between awaits, `std::thread::sleep`) keeps its lease, and so do the handlers
//! that share a worker thread with it, on a multi-thread runtime and on a `current_thread` one
//! (`#[tokio::test]`'s default) alike. The same thread finishes, in the background, the release
//! or the done mark of a call whose future was dropped.
//!
//! A store that cannot open a connection of its own (a `RedisStore` built with
//! `RedisStore::new` on your connection) renews through yours: its I/O then runs on the runtime
//! that opened it, and a blocked runtime can cost a lease.
//!
//! Registering a lease costs a map insert and removal; the watchdog wakes when the earliest
//! renewal is due, so handlers that finish within `ttl / 3` are never renewed at all.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::run::CatchUnwind;
use crate::store::{Lease, Store};
use crate::{Key, StoreError};

/// The lease of the idempotent handler that is running: its scope, key and fence, and whether it
/// is still held. Get it with [`current_lease`] inside the handler.
///
/// Pass the fence to downstream writes that can reject a stale holder (`UPDATE ... SET fence = $f
/// WHERE fence < $f`): a handler whose lease lapsed and was taken over has a smaller fence than
/// the holder that took over.
///
/// ```
/// use idem_runtime::{current_lease, idempotent, Error, MemoryStore};
///
/// #[idempotent(key = "order_id", store = "store")]
/// async fn ship(store: &MemoryStore, order_id: u64) -> Result<u64, Error> {
///     let lease = current_lease().expect("inside an idempotent handler");
///     assert_eq!(lease.key().as_str(), "7");
///     assert!(!lease.is_lost());
///     Ok(lease.fence()) // e.g. written next to the shipment, to refuse older holders
/// }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// assert!(ship(&store, 7).await.unwrap() > 0);
/// assert!(current_lease().is_none()); // outside a handler
/// # });
/// ```
#[derive(Clone)]
pub struct CurrentLease {
    held: Arc<Held>,
}

impl std::fmt::Debug for CurrentLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentLease")
            .field("scope", &self.scope())
            .field("key", self.key())
            .field("fence", &self.fence())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl CurrentLease {
    /// The scope of the key.
    pub fn scope(&self) -> &str {
        &self.held.scope
    }

    /// The key.
    pub fn key(&self) -> &Key {
        &self.held.key
    }

    /// The fence of this lease: greater than the fence of every earlier lease of the key.
    pub fn fence(&self) -> u64 {
        self.held.lease.fence
    }

    /// Whether the lease is gone, or can no longer be kept: the store said another holder has
    /// it, it was not renewed past the handler's `max_lease`, or the store panicked renewing it
    /// (renewals then stop). From then on it lapses `ttl` after its last renewal, and a
    /// handler that keeps going may run beside a duplicate: its completion is refused
    /// ([`Error::LeaseLost`](crate::Error::LeaseLost)) once another caller took the key (until
    /// then it may still succeed), and, in the transactional form, its writes then roll back.
    /// Stop, or fence your writes.
    pub fn is_lost(&self) -> bool {
        self.held.lost.load(Ordering::Acquire)
    }

    /// Resolves when the lease is lost (see [`is_lost`](Self::is_lost)); never, if it is not.
    /// Select on it to stop work that is no longer protected:
    ///
    /// ```no_run
    /// # async fn work() {}
    /// # async fn handler() -> Result<(), idem_runtime::Error> {
    /// let lease = idem_runtime::current_lease().expect("inside a handler");
    /// tokio::select! {
    ///     _ = work() => Ok(()),
    ///     _ = lease.lost() => Err(idem_runtime::Error::LeaseLost {
    ///         scope: lease.scope().to_owned(),
    ///         key: lease.key().clone(),
    ///     }),
    /// }
    /// # }
    /// ```
    pub async fn lost(&self) {
        loop {
            let mut signal = pin!(self.held.signal.notified());
            signal.as_mut().enable();
            if self.is_lost() {
                return;
            }
            signal.await;
        }
    }
}

tokio::task_local! {
    static CURRENT: Arc<Held>;
}

/// The lease of the idempotent handler running in this task, if any (inside the body of an
/// `#[idempotent]` fn, or the closure given to [`run`](crate::run) or `run_in_tx`). A task the
/// handler spawns does not inherit it: pass the [`CurrentLease`] along.
pub fn current_lease() -> Option<CurrentLease> {
    CURRENT
        .try_with(|held| CurrentLease { held: held.clone() })
        .ok()
}

/// What the wrapper and the watchdog share about one lease.
pub(crate) struct Held {
    pub(crate) scope: Cow<'static, str>,
    pub(crate) key: Key,
    pub(crate) lease: Lease,
    lost: AtomicBool,
    /// The handler has returned: a renewal that finds the key done or released is no news.
    finishing: AtomicBool,
    /// A transactional call nested in this one found the transaction gone and rolled it back:
    /// this call's writes went with it, so it must not mark its key done either.
    aborted: AtomicBool,
    /// The connection of the transaction a transactional call runs in ([`TxRef::identity`]),
    /// 0 for a call that has none: a call nested in it on another transaction that finds its
    /// own transaction gone does not abort this one.
    ///
    /// [`TxRef::identity`]: crate::TxRef
    pub(crate) tx: std::sync::atomic::AtomicUsize,
    /// The call this one is nested in (the task's lease when it was made), so that an abort
    /// reaches every enclosing call on the same transaction, through calls on others between.
    parent: Option<Arc<Held>>,
    signal: Notify,
    /// Claims of nested transactional calls, made outside the transaction this handler runs in
    /// (MySQL/MariaDB), whose done marks are in that transaction: if this call undoes its writes
    /// to its savepoint, their marks go with them, and their claims are released.
    pub(crate) nested: Mutex<Vec<Outside>>,
}

/// A claim held outside the caller's transaction, and what releases it.
pub(crate) struct Outside {
    pub(crate) releaser: Arc<dyn Store>,
    pub(crate) scope: String,
    pub(crate) key: Key,
    pub(crate) lease: Lease,
    pub(crate) ttl: Duration,
}

impl Held {
    pub(crate) fn new(scope: Cow<'static, str>, key: Key, lease: Lease) -> Arc<Held> {
        Arc::new(Held {
            scope,
            key,
            lease,
            lost: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            tx: std::sync::atomic::AtomicUsize::new(0),
            parent: Held::enclosing(),
            signal: Notify::new(),
            nested: Mutex::new(Vec::new()),
        })
    }

    /// The handler returned: the mark or the release follows (renewals go on until then).
    pub(crate) fn finishing(&self) {
        self.finishing.store(true, Ordering::Release);
    }

    /// The transaction this call runs in was rolled back under it (by a nested call).
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }

    /// The transaction `tx` (a [`TxRef::identity`](crate::TxRef)) was rolled back under the
    /// call running in this task: abort every enclosing call on it, however deep.
    pub(crate) fn abort_enclosing_on(tx: usize) {
        let mut next = Held::enclosing();
        while let Some(held) = next {
            if held.tx.load(Ordering::Relaxed) == tx {
                held.abort();
            }
            next = held.parent.clone();
        }
    }

    /// Whether [`abort`](Self::abort) was called.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// The lease of the idempotent handler this task is running in, if any (the enclosing call
    /// of a nested one).
    pub(crate) fn enclosing() -> Option<Arc<Held>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    fn lose(&self) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            self.signal.notify_waiters();
        }
    }

    /// Run `f` with this lease as the task's [`current_lease`].
    pub(crate) fn scope<F: Future>(self: &Arc<Self>, f: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self.clone(), f)
    }
}

/// Keeps a lease renewed until dropped.
pub(crate) struct Watch {
    dog: &'static Watchdog,
    shard: usize,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.dog.shards[self.shard]).remove(&self.id);
    }
}

/// Renew `held` every `ttl / 3` through `renewer`, on the watchdog thread, until the returned
/// guard is dropped or `max_lease` has passed. `asked` is when the claim was sent: the store
/// started the lease no earlier, so the first renewal is due `ttl / 3` after it (at once, if the
/// grant was read late: a thread blocked between the store's answer and this call).
pub(crate) fn watch(
    pid: u32,
    held: &Arc<Held>,
    renewer: Arc<dyn Store>,
    ttl: Duration,
    max_lease: Option<Duration>,
    asked: Instant,
) -> Watch {
    let dog = watchdog_of(pid);
    let now = dog.now();
    let since = nanos(asked.saturating_duration_since(dog.epoch)).min(now);
    let due = since.saturating_add(nanos(ttl / 3));
    let id = dog.next_id.fetch_add(1, Ordering::Relaxed);
    let shard = (id as usize) % SHARDS;
    lock(&dog.shards[shard]).insert(
        id,
        Entry {
            held: held.clone(),
            renewer,
            ttl,
            deadline: max_lease.map(|m| since.saturating_add(nanos(m))),
            due,
            renewing: false,
        },
    );
    dog.wake_if_before(due);
    Watch { dog, shard, id }
}

/// Renew `held` now, through `renewer` on the watchdog's runtime (whose connections it owns), and
/// wait for the answer: for a grant that was read late, before the handler may start.
pub(crate) async fn renew_now(
    renewer: Arc<dyn Store>,
    held: Arc<Held>,
    ttl: Duration,
) -> Result<(), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn_background(async move {
        let renewed = CatchUnwind {
            inner: renewer.extend(&held.scope, &held.key, &held.lease, ttl),
        }
        .await
        .unwrap_or_else(|_panic| Err(StoreError::unavailable("the store panicked renewing")));
        let _ = tx.send(renewed);
    });
    rx.await
        .unwrap_or_else(|_| Err(StoreError::unavailable("the watchdog's runtime is gone")))
}

/// Run `f` on the watchdog's runtime: work that must finish although the caller's future was
/// dropped (a release, a done mark), and that must not wait for the application's runtime.
pub(crate) fn spawn_background<F>(f: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let dog = watchdog();
    dog.background.fetch_add(1, Ordering::SeqCst);
    // Counted down when the task ends, however it ends (a panic, the runtime shutting down).
    let pending = Pending(dog);
    dog.handle.spawn(async move {
        let _pending = pending;
        f.await;
    });
}

/// Run `f` on the watchdog's runtime, not counted as work [`wait_for_background`] waits for.
pub(crate) fn spawn_detached<F>(f: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    watchdog().handle.spawn(f);
}

struct Pending(&'static Watchdog);

impl Drop for Pending {
    fn drop(&mut self) {
        if self.0.background.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// Wait, up to `timeout`, for the work this process finishes in the background: the done marks
/// and releases of calls whose futures were dropped (a request timeout, a consumer cancelled at
/// shutdown) after their handler ran. Returns whether all of it finished.
///
/// That work runs on the `idem-watchdog` thread, which does not keep the process alive: call this
/// before `main` returns (after your server or consumer stopped taking work), or a done mark in
/// flight is lost with the process, and the message's redelivery runs the handler again once the
/// lease expires.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // ... the server stopped taking requests ...
/// if !idem_runtime::wait_for_background(std::time::Duration::from_secs(5)).await {
///     eprintln!("some done marks were not written: their keys will run again after the ttl");
/// }
/// # }
/// ```
pub async fn wait_for_background(timeout: Duration) -> bool {
    let dog = watchdog();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let settled = dog.settled.notified();
        let mut settled = pin!(settled);
        // Registered before the count is read, so a task ending in between still wakes us.
        settled.as_mut().enable();
        if dog.background.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if tokio::time::timeout_at(deadline, settled).await.is_err() {
            return dog.background.load(Ordering::SeqCst) == 0;
        }
    }
}

const SHARDS: usize = 16;

struct Entry {
    held: Arc<Held>,
    renewer: Arc<dyn Store>,
    ttl: Duration,
    /// When renewals stop (`max_lease`), in ns since the watchdog's epoch.
    deadline: Option<u64>,
    /// When the next renewal is due, in ns since the watchdog's epoch.
    due: u64,
    /// A renewal is in flight.
    renewing: bool,
}

struct Watchdog {
    /// The process this watchdog's thread lives in (a forked child needs its own).
    pid: u32,
    epoch: Instant,
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
    next_id: AtomicU64,
    /// When the scanner wakes next (ns since epoch; `u64::MAX` while it scans or has nothing to
    /// do): a new lease due earlier must wake it.
    next_wake: AtomicU64,
    wake: Notify,
    handle: tokio::runtime::Handle,
    /// Background tasks (releases, done marks) not finished yet, and their signal at zero.
    background: AtomicUsize,
    settled: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one map operation: a panic cannot leave a map half-done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The watchdog of this process, started on first use.
fn watchdog() -> &'static Watchdog {
    watchdog_of(std::process::id())
}

/// The watchdog of the process `pid` (this one's, read by the caller), started on first use.
fn watchdog_of(pid: u32) -> &'static Watchdog {
    static FIRST: OnceLock<&'static Watchdog> = OnceLock::new();
    static FORKED: Mutex<Vec<&'static Watchdog>> = Mutex::new(Vec::new());
    let first = *FIRST.get_or_init(|| Watchdog::start(pid));
    if first.pid == pid {
        return first;
    }
    // A forked child: threads do not survive `fork`, so the parent's watchdog is not running here.
    let mut forked = lock(&FORKED);
    if let Some(dog) = forked.iter().find(|d| d.pid == pid) {
        return dog;
    }
    let dog = Watchdog::start(pid);
    forked.push(dog);
    dog
}

impl Watchdog {
    fn start(pid: u32) -> &'static Watchdog {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (dog_tx, dog_rx) = std::sync::mpsc::channel::<&'static Watchdog>();
        std::thread::Builder::new()
            .name("idem-watchdog".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the idem watchdog's runtime");
                let _ = handle_tx.send(runtime.handle().clone());
                if let Ok(dog) = dog_rx.recv() {
                    runtime.block_on(dog.scan_forever());
                }
            })
            .expect("start the idem-watchdog thread");
        let handle = handle_rx
            .recv()
            .expect("the idem watchdog's runtime started");
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            pid,
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(0),
            next_wake: AtomicU64::new(u64::MAX),
            wake: Notify::new(),
            handle,
            background: AtomicUsize::new(0),
            settled: Notify::new(),
        }));
        let _ = dog_tx.send(dog);
        dog
    }

    fn now(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    fn wake_if_before(&self, due: u64) {
        if due < self.next_wake.load(Ordering::SeqCst) {
            // Stores a permit if the scanner is busy, so it scans again before it sleeps.
            self.wake.notify_one();
        }
    }

    async fn scan_forever(&'static self) {
        loop {
            // While scanning, every new lease wakes the scanner (a permit), so none is missed.
            self.next_wake.store(u64::MAX, Ordering::SeqCst);
            let now = self.now();
            let mut next = u64::MAX;
            for (shard, entries) in self.shards.iter().enumerate() {
                for (&id, e) in lock(entries).iter_mut() {
                    if e.renewing || e.held.lost.load(Ordering::Acquire) {
                        continue;
                    }
                    if e.deadline.is_some_and(|d| d <= now) {
                        crate::metrics::lease_lost(&e.held.scope);
                        tracing::warn!(
                            scope = %e.held.scope,
                            key = %e.held.key,
                            "the handler outlived its max_lease: no longer renewing its lease"
                        );
                        e.held.lose();
                        continue;
                    }
                    if e.due <= now {
                        e.renewing = true;
                        let (held, renewer, ttl) = (e.held.clone(), e.renewer.clone(), e.ttl);
                        tokio::spawn(self.renew(shard, id, held, renewer, ttl));
                    } else {
                        next = next.min(e.due);
                    }
                    if let Some(d) = e.deadline {
                        next = next.min(d);
                    }
                }
            }
            self.next_wake.store(next, Ordering::SeqCst);
            // Idle: sleep until woken (an hour at most, to stay simple about clocks).
            let wait = next
                .saturating_sub(self.now())
                .min(nanos(Duration::from_secs(3600)));
            let _ = tokio::time::timeout(Duration::from_nanos(wait), self.wake.notified()).await;
        }
    }

    async fn renew(
        &'static self,
        shard: usize,
        id: u64,
        held: Arc<Held>,
        renewer: Arc<dyn Store>,
        ttl: Duration,
    ) {
        let period = ttl / 3;
        // A store that panics must not leave this entry marked as renewing forever (its lease
        // would lapse with no one told): the panic is caught and the lease counted as lost.
        let renewal = CatchUnwind {
            inner: renewer.extend(&held.scope, &held.key, &held.lease, ttl),
        };
        let again_in = match tokio::time::timeout(period, renewal).await {
            Ok(Err(_panic)) => {
                tracing::error!(scope = %held.scope, key = %held.key, "the store panicked renewing the lease; the lease is counted as lost");
                held.lose();
                return;
            }
            Ok(Ok(Ok(()))) => {
                crate::metrics::renewal("ok");
                tracing::trace!(scope = %held.scope, key = %held.key, "lease renewed");
                period
            }
            Ok(Ok(Err(StoreError::LeaseLost))) => {
                crate::metrics::renewal("lost");
                if held.finishing.load(Ordering::Acquire) {
                    // Most likely the mark or the release landed first: nothing was lost.
                    tracing::debug!(scope = %held.scope, key = %held.key, "renewal found the lease ended as the call finished");
                } else {
                    crate::metrics::lease_lost(&held.scope);
                    tracing::warn!(scope = %held.scope, key = %held.key, "lease lost while the handler runs");
                }
                held.lose();
                return;
            }
            Ok(Ok(Err(e))) => {
                crate::metrics::renewal("failed");
                crate::metrics::store_error_in(&held.scope, crate::Phase::Extend);
                tracing::warn!(scope = %held.scope, key = %held.key, error = %e, "lease renewal failed; retrying");
                period / 4
            }
            // A renewal that hangs (a pool waiting for a connection, a lock) must not stop the
            // ones after it, or the lease lapses under a live handler.
            Err(_) => {
                crate::metrics::renewal("failed");
                crate::metrics::store_error_in(&held.scope, crate::Phase::Extend);
                tracing::warn!(scope = %held.scope, key = %held.key, "lease renewal timed out; retrying");
                Duration::ZERO
            }
        };
        let due = self.now().saturating_add(nanos(again_in));
        if let Some(e) = lock(&self.shards[shard]).get_mut(&id) {
            e.due = due;
            e.renewing = false;
        } else {
            return; // the handler finished meanwhile
        }
        self.wake_if_before(due);
    }
}
