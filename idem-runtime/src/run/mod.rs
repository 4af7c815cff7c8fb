//! The lock-check-execute-mark wrapper that `#[idempotent]` expands to.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

use crate::store::{Begin, BeginRequest, Lease, Store, StoreHandle, Token};
use crate::{Error, Fingerprint, Key, KeyPart, Options, Phase, StoreError};
use crate::{codec, metrics};

/// The return type of an idempotent handler: `Result<T, E>`, where `T` is stored and replayed and
/// `E` absorbs idem's [`Error`].
#[diagnostic::on_unimplemented(
    message = "an idempotent handler must return `Result<T, E>`, not `{Self}`",
    label = "idem stores `T` to replay it and returns its own errors through `E`",
    note = "change the return type to `Result<{Self}, YourError>` where `YourError: From<idem_runtime::Error>`"
)]
pub trait Outcome: Sized {
    /// The value that is stored and replayed.
    type Ok;
    /// The handler's error.
    type Err;
    /// Split into a `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// Rebuild from a `Result`.
    fn from_result(r: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T, E> Outcome for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Self {
        self
    }
    fn from_result(r: Self) -> Self {
        r
    }
}

/// An output type that can be stored and replayed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be replayed: idempotent outputs must implement `Serialize` and `Deserialize`",
    label = "the `Ok` type of an idempotent handler is stored so duplicates get it back",
    note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}`, or return a type that has them (`()` is fine)"
)]
pub trait Replayable: Serialize + DeserializeOwned + Send {}
// Report the missing trait by this trait's message, once, rather than each missing bound.
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send> Replayable for T {}

/// An error type that can carry idem's own errors.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot carry idem's errors",
    label = "an idempotent handler's error type needs `From<idem_runtime::Error>`",
    note = "add `#[error(transparent)] Idem(#[from] idem_runtime::Error)` to your thiserror enum, or `impl From<idem_runtime::Error> for {Self}`; `anyhow::Error` and `Box<dyn Error + Send + Sync>` already work"
)]
pub trait AbsorbsIdemError: From<Error> {}
// Report the missing trait by this trait's message, once, rather than each missing bound.
#[diagnostic::do_not_recommend]
impl<E: From<Error>> AbsorbsIdemError for E {}

/// One call of an idempotent handler: its key and, optionally, its payload fingerprint.
///
/// ```
/// use idem_runtime::{Call, Fingerprint};
/// let call = Call::new(&"order-42").fingerprint(Fingerprint::builder().add(&99_u32).finish());
/// assert_eq!(call.key().unwrap().as_str(), "order-42");
/// ```
#[derive(Debug)]
pub struct Call {
    key: Result<Key, Error>,
    fingerprint: Option<Fingerprint>,
}

impl Call {
    /// A call keyed by `key`. An invalid key (empty) is reported when the call runs.
    pub fn new<K: KeyPart + ?Sized>(key: &K) -> Call {
        Call::from_key(Key::new(key))
    }

    /// A call with a key built elsewhere (e.g. by [`KeyBuilder`](crate::KeyBuilder)).
    pub fn from_key(key: Result<Key, Error>) -> Call {
        Call {
            key,
            fingerprint: None,
        }
    }

    /// Require this fingerprint to match on replay.
    pub fn fingerprint(mut self, fp: Fingerprint) -> Call {
        self.fingerprint = Some(fp);
        self
    }

    /// The key, or why it is invalid.
    pub fn key(&self) -> Result<&Key, &Error> {
        self.key.as_ref()
    }
}

/// Run `handler` at most once per key: the wrapper `#[idempotent]` generates, for code where an
/// attribute does not fit.
///
/// Claims the key, replays the stored output of a completed key, otherwise runs the handler while
/// renewing its lease, then marks the key done with the output (`Ok`) or releases it (`Err`,
/// panic, cancellation) so a redelivery can run.
///
/// ```
/// use idem_runtime::{Call, MemoryStore, Options, run};
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let opts = Options::new("coupons");
/// let issued = AtomicU32::new(0);
/// for _delivery in 0..3 {
///     let coupon: Result<u32, idem_runtime::Error> = run(&store, &opts, Call::new(&1001u64), || async {
///         Ok(issued.fetch_add(1, Ordering::SeqCst) + 500)
///     })
///     .await;
///     assert_eq!(coupon.unwrap(), 500); // replayed on the 2nd and 3rd delivery
/// }
/// assert_eq!(issued.load(Ordering::SeqCst), 1);
/// # });
/// ```
pub async fn run<S, R, F, Fut>(store: &S, opts: &Options, call: Call, handler: F) -> R
where
    S: StoreHandle + ?Sized,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    let store = match store.store() {
        Ok(s) => s,
        Err(e) => return lift(opts, e),
    };
    // Laziness matters here: `handler` is only called once the key is ours.
    execute(store, opts, call, Marking::ByWrapper, move |_| handler()).await
}

/// What the macro calls: `fut` is the user's body, not yet polled.
#[doc(hidden)]
pub async fn run_future<S, R, Fut>(store: &S, opts: &Options, call: Call, fut: Fut) -> R
where
    S: StoreHandle + ?Sized,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    Fut: Future<Output = R>,
{
    let store = match store.store() {
        Ok(s) => s,
        Err(e) => return lift(opts, e),
    };
    execute(store, opts, call, Marking::ByWrapper, move |_| fut).await
}

/// Return one of idem's errors through the handler's error type, counting it.
fn lift<R: Outcome>(opts: &Options, e: Error) -> R
where
    R::Err: From<Error>,
{
    metrics::record(opts, metrics::Outcome::of(&e));
    R::from_result(Err(e.into()))
}

pub(crate) fn store_error(e: StoreError, phase: Phase, scope: &str, key: &Key) -> Error {
    match e {
        StoreError::LeaseLost => Error::LeaseLost {
            scope: scope.to_owned(),
            key: key.to_string(),
        },
        StoreError::Corrupt(reason) => Error::Corrupt {
            scope: scope.to_owned(),
            key: key.to_string(),
            reason,
        },
        StoreError::Unavailable(source) => Error::Unavailable { phase, source },
    }
}

/// Who writes the done mark after the handler returned `Ok`.
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marking {
    /// The wrapper calls [`Store::complete`] (the usual case).
    ByWrapper,
    /// The handler already wrote (and committed) the done mark for the lease it was given, e.g. in
    /// its own database transaction: `Ok` needs no further store call.
    ByHandler,
}

/// The wrapper's core: lock, check, run `handler` with the lease it holds while renewing it, then
/// mark (see [`Marking`]) or release.
pub(crate) async fn execute<R, F, Fut>(
    store: &dyn Store,
    opts: &Options,
    call: Call,
    marking: Marking,
    handler: F,
) -> R
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce(Lease) -> Fut,
    Fut: Future<Output = R>,
{
    let key = match call.key {
        Ok(k) => k,
        Err(e) => return lift(opts, e),
    };
    let scope: &str = &opts.scope;
    let req = BeginRequest {
        scope,
        key: &key,
        token: Token::generate(),
        ttl: opts.ttl,
        fingerprint: call.fingerprint,
    };

    // Lock and check.
    let mut wait_deadline = None;
    let mut backoff = Duration::from_millis(5);
    let lease = loop {
        match store.begin(&req).await {
            Ok(Begin::Acquired(lease)) => break lease,
            Ok(Begin::Completed { output }) => {
                tracing::debug!(scope, key = %key, "duplicate of a completed key: replayed");
                return match codec::decode::<R::Ok>(&output) {
                    Ok(v) => {
                        metrics::record(opts, metrics::Outcome::Replayed);
                        R::from_result(Ok(v))
                    }
                    Err(reason) => lift(
                        opts,
                        Error::Corrupt {
                            scope: scope.to_owned(),
                            key: key.to_string(),
                            reason,
                        },
                    ),
                };
            }
            Ok(Begin::Mismatch) => {
                return lift(
                    opts,
                    Error::Mismatch {
                        scope: scope.to_owned(),
                        key: key.to_string(),
                    },
                );
            }
            Ok(Begin::InFlight { retry_after }) => {
                let now = Instant::now();
                let deadline = opts.wait.map(|w| *wait_deadline.get_or_insert(now + w));
                match deadline {
                    Some(d) if d > now => {
                        let pause = backoff.min(retry_after).min(d - now);
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        store.wait(scope, &key, pause).await;
                    }
                    _ => {
                        tracing::debug!(scope, key = %key, ?retry_after, "duplicate while in flight");
                        return lift(
                            opts,
                            Error::InFlight {
                                scope: scope.to_owned(),
                                key: key.to_string(),
                                retry_after,
                            },
                        );
                    }
                }
            }
            Err(e) => return lift(opts, store_error(e, Phase::Begin, scope, &key)),
        }
    };

    // Execute, renewing the lease; a drop of this future (cancellation) releases in the background.
    let mut guard = ReleaseGuard {
        store,
        scope,
        key: &key,
        lease: Some(lease),
    };
    let outcome = Renewing {
        store,
        scope,
        key: &key,
        lease: &lease,
        ttl: opts.ttl,
        timer: None,
        renewal: None,
        lost: false,
        handler: pin!(CatchUnwind {
            inner: handler(lease)
        }),
    }
    .await;

    // Mark (or release).
    match outcome {
        Err(panic) => {
            metrics::record(opts, metrics::Outcome::Panicked);
            release(store, scope, &key, &lease).await;
            guard.lease = None;
            resume_unwind(panic)
        }
        Ok(result) => match result.into_result() {
            Err(e) => {
                metrics::record(opts, metrics::Outcome::HandlerError);
                release(store, scope, &key, &lease).await;
                guard.lease = None;
                R::from_result(Err(e))
            }
            Ok(value) => {
                // From here on the effect has happened: never release, or a redelivery runs again.
                guard.lease = None;
                if marking == Marking::ByHandler {
                    metrics::record(opts, metrics::Outcome::Executed);
                    return R::from_result(Ok(value));
                }
                let bytes = codec::encode(&value);
                match complete(store, scope, &key, &lease, &bytes, opts.keep).await {
                    Ok(()) => {
                        metrics::record(opts, metrics::Outcome::Executed);
                        R::from_result(Ok(value))
                    }
                    Err(e) => {
                        tracing::error!(scope, key = %key, error = %e, "handler ran but its done mark was not written");
                        lift(opts, store_error(e, Phase::Complete, scope, &key))
                    }
                }
            }
        },
    }
}

/// `complete` is idempotent, so a transient failure is retried a few times before giving up.
async fn complete(
    store: &dyn Store,
    scope: &str,
    key: &Key,
    lease: &Lease,
    output: &[u8],
    keep: Duration,
) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match store.complete(scope, key, lease, output, keep).await {
            Err(StoreError::Unavailable(e)) if attempt < 2 => {
                attempt += 1;
                tracing::warn!(scope, key = %key, error = %e, attempt, "complete failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            r => return r,
        }
    }
}

async fn release(store: &dyn Store, scope: &str, key: &Key, lease: &Lease) {
    if let Err(e) = store.release(scope, key, lease).await {
        // Not fatal: the lease expires after its ttl and the key becomes free anyway.
        tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when its lease expires");
    }
}

/// Releases the lease if the wrapper is dropped before it finished (the caller was cancelled).
struct ReleaseGuard<'a> {
    store: &'a dyn Store,
    scope: &'a str,
    key: &'a Key,
    lease: Option<Lease>,
}

impl Drop for ReleaseGuard<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            tracing::debug!(scope = self.scope, key = %self.key, "cancelled while holding the lease: releasing");
            self.store.release_detached(self.scope, self.key, lease);
        }
    }
}

/// A store operation in progress (what `async_trait` methods return).
type StoreCall<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Polls the handler and, while it runs, renews the lease every third of its ttl (the watchdog).
/// Everything runs in the caller's task: no spawn, and no timer at all for a handler that finishes
/// on its first poll.
struct Renewing<'a, H> {
    store: &'a dyn Store,
    scope: &'a str,
    key: &'a Key,
    lease: &'a Lease,
    ttl: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    renewal: Option<StoreCall<'a>>,
    /// Set once the store said the lease is gone: renewing again is pointless.
    lost: bool,
    handler: Pin<&'a mut H>,
}

impl<H: Future> Future for Renewing<'_, H> {
    type Output = H::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<H::Output> {
        let this = &mut *self;
        if let Poll::Ready(out) = this.handler.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if this.lost {
            // Only the handler can wake us now.
            return Poll::Pending;
        }
        let period = this.ttl / 3;
        loop {
            // One timer serves both as "next renewal is due" and, while a renewal is in flight,
            // as its deadline: a renewal that hangs (a pool waiting for a connection, a lock)
            // must not stop the ones after it, or the lease lapses under a live handler.
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            let due = timer.as_mut().poll(cx).is_ready();
            if let Some(renewal) = this.renewal.as_mut() {
                let next = match renewal.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => period,
                    Poll::Ready(Err(StoreError::LeaseLost)) => {
                        // Stop renewing; completion will report LeaseLost (or record the effect
                        // if nobody took over).
                        tracing::warn!(scope = this.scope, key = %this.key, "lease lost while the handler runs");
                        this.renewal = None;
                        this.timer = None;
                        this.lost = true;
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(scope = this.scope, key = %this.key, error = %e, "lease renewal failed; retrying");
                        period / 4
                    }
                    Poll::Pending if due => {
                        tracing::warn!(scope = this.scope, key = %this.key, "lease renewal timed out; retrying");
                        Duration::ZERO
                    }
                    Poll::Pending => return Poll::Pending,
                };
                this.renewal = None;
                if let Some(t) = this.timer.as_mut() {
                    t.as_mut().reset(Instant::now() + next);
                }
                continue;
            }
            if !due {
                return Poll::Pending;
            }
            this.renewal = Some(
                this.store
                    .extend(this.scope, this.key, this.lease, this.ttl),
            );
            if let Some(t) = this.timer.as_mut() {
                t.as_mut().reset(Instant::now() + period);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Turns a panic inside the handler into a value, so the lease is released before the panic
    /// resumes.
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
