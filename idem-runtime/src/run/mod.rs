//! The lock-check-execute-mark wrapper that `#[idempotent]` expands to.
//!
//! `mod.rs` holds what both forms share (the call, its span and errors) and the plain form, where
//! the wrapper writes the done mark after the handler; `claim.rs` the claim loop and replay;
//! `finish.rs` the guard that finishes a dropped call in the background; `tx.rs` the
//! transactional form, where the mark is written in the handler's own transaction.

mod claim;
mod finish;
mod tx;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::lease::{self, Held};
use crate::observe::{CallOutcome, Would};
use crate::store::{BeginRequest, Store, StoreHandle, Token};
use crate::{Error, Fingerprint, Key, KeyPart, Options, Phase, StoreError, metrics};
pub(crate) use claim::{CONFIRM_ROUNDS, Claimant, Granted, Refusal, claim, confirm, taken_over};
use finish::complete;
pub(crate) use finish::{Finish, release, release_later};
use tracing::Instrument;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) use tx::replay_committed;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) use tx::{Marked, NESTED, Owned, claim_outside, execute_tx};
pub use tx::{TxConnection, TxRef, run_tx_future, tx_access};

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
    note = "derive `serde::Serialize` and `serde::Deserialize` for `{Self}`, or return a type that has them (`()` is fine); axum's `Json<T>` and `(StatusCode, Json<T>)` are stored as their `T`, which needs them; another response wrapper: return `T`, and wrap it outside the handler"
)]
pub trait Replayable: Serialize + DeserializeOwned + Send {}
// No `do_not_recommend`: rustc then names the type at fault, also where it is nested
// (`Vec<Receipt>` → `Receipt`), one error per missing trait (`Serialize`, `Deserialize`).
impl<T: Serialize + DeserializeOwned + Send> Replayable for T {}

/// An error type that can carry idem's own errors.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot carry idem's errors",
    label = "an idempotent handler's error type needs `From<idem_runtime::Error>`",
    note = "add `#[error(transparent)] Idem(#[from] idem_runtime::Error)` to your own error enum (thiserror), or implement `From<idem_runtime::Error>` for your own error type; `anyhow::Error` and `Box<dyn std::error::Error + Send + Sync>` already work (a type you do not own, such as `String`, cannot get the impl: use one of those)"
)]
pub trait AbsorbsIdemError: From<Error> {}
// Report the missing trait by this trait's message, once, rather than each missing bound.
#[diagnostic::do_not_recommend]
impl<E: From<Error>> AbsorbsIdemError for E {}

/// One call of an idempotent handler: its key and, optionally, its payload fingerprint.
///
/// ```
/// use idem_runtime::{Call, Fingerprint};
/// let call = Call::new(&"order-42").fingerprint(Fingerprint::of(&99_u32));
/// assert_eq!(call.key().unwrap().as_str(), "order-42");
/// ```
#[derive(Debug)]
pub struct Call {
    key: Result<Key, Error>,
    fingerprint: Option<Result<Fingerprint, Error>>,
    /// `false` for [`Call::unkeyed`].
    keyed: bool,
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
            keyed: true,
        }
    }

    /// A call without a key: the handler runs as a plain call, with no claim, no replay and no
    /// mark, as if it were not idempotent. It is what `#[idempotent]` makes of an `Option` key
    /// of an [`OptionalKey`](crate::OptionalKey) type that is `None` (an HTTP request without
    /// its optional `Idempotency-Key` header); the other
    /// entry points (`run_in_tx`, `run_with_tx`) refuse it with [`Error::InvalidKey`]. Such a call
    /// holds no lease of its own: inside it, [`current_lease`](crate::current_lease) is the
    /// enclosing idempotent call's, if any, and [`observe`](crate::observe) reports nothing.
    ///
    /// ```
    /// use idem_runtime::{Call, MemoryStore, Options, run};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let store = MemoryStore::new();
    /// let opts = Options::new("payments");
    /// let mut runs = 0;
    /// for _ in 0..2 {
    ///     let out: Result<u32, idem_runtime::Error> =
    ///         run(&store, &opts, Call::unkeyed(), || async { runs += 1; Ok(7) }).await;
    ///     assert_eq!(out.unwrap(), 7);
    /// }
    /// assert_eq!(runs, 2); // no key, no deduplication
    /// # });
    /// ```
    pub fn unkeyed() -> Call {
        Call {
            key: Err(Error::InvalidKey {
                reason: "the call has no key",
            }),
            fingerprint: None,
            keyed: false,
        }
    }

    /// Whether the call has a key (see [`Call::unkeyed`]).
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// Require this fingerprint to match on replay: a [`Fingerprint`], or what
    /// [`FingerprintBuilder::finish`](crate::FingerprintBuilder::finish) returned (an error is
    /// reported when the call runs, and the handler does not run).
    pub fn fingerprint(mut self, fp: impl Into<Result<Fingerprint, Error>>) -> Call {
        self.fingerprint = Some(fp.into());
        self
    }

    /// The key, or why it is invalid.
    pub fn key(&self) -> Result<&Key, &Error> {
        self.key.as_ref()
    }

    /// The key and fingerprint, or the error that stops the call before the store is asked.
    fn into_parts(self) -> Result<(Key, Option<Fingerprint>), Error> {
        let key = self.key?;
        let fingerprint = self.fingerprint.transpose()?;
        Ok((key, fingerprint))
    }

    /// [`into_parts`](Self::into_parts), keeping the call (the error is rebuilt for the caller).
    #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
    fn parts(&self) -> Result<(Key, Option<Fingerprint>), Error> {
        let key = self.key.as_ref().map_err(Error::again)?.clone();
        let fingerprint = match &self.fingerprint {
            None => None,
            Some(Ok(fp)) => Some(*fp),
            Some(Err(e)) => return Err(e.again()),
        };
        Ok((key, fingerprint))
    }
}

/// Run `handler` at most once per key: the wrapper `#[idempotent]` generates, for code where an
/// attribute does not fit.
///
/// Claims the key, replays the stored output of a completed key, otherwise runs the handler while
/// idem's watchdog renews its lease, then marks the key done with the output (`Ok`) or releases it
/// (`Err`, panic, cancellation) so a redelivery can run. Inside `handler`,
/// [`current_lease`](crate::current_lease) gives the lease (its fence, and whether it was lost).
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
    // The span first: a call refused before the store is asked has one too.
    async move {
        if !call.keyed {
            return unkeyed(handler()).await;
        }
        let store = match store.store() {
            Ok(s) => s,
            Err(e) => return lift(opts, e),
        };
        // Laziness matters here: `handler` is only called once the key is ours.
        execute(store, opts, call, handler).await
    }
    .instrument(call_span(opts))
    .await
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
    async move {
        if !call.keyed {
            return unkeyed(fut).await;
        }
        let store = match store.store() {
            Ok(s) => s,
            Err(e) => return lift(opts, e),
        };
        execute(store, opts, call, move || fut).await
    }
    .instrument(call_span(opts))
    .await
}

/// A call without a key ([`Call::unkeyed`]): the handler as a plain call. The store is not
/// asked, so a missing store is not an error here.
pub(crate) async fn unkeyed<R, Fut: Future<Output = R>>(fut: Fut) -> R {
    tracing::debug!("no key: the handler runs as a plain call, not deduplicated");
    fut.await
}

/// Return one of idem's errors through the handler's error type, counting it.
pub(crate) fn lift<R: Outcome>(opts: &Options, e: Error) -> R
where
    R::Err: From<Error>,
{
    metrics::record(opts, CallOutcome::of(&e), e.key(), None);
    R::from_result(Err(e.into()))
}

pub(crate) fn store_error(e: StoreError, phase: Phase, scope: &str, key: &Key) -> Error {
    match e {
        StoreError::LeaseLost => Error::LeaseLost {
            scope: scope.to_owned(),
            key: key.clone(),
        },
        StoreError::Corrupt(reason) => Error::Corrupt {
            scope: scope.to_owned(),
            key: key.clone(),
            reason,
        },
        StoreError::Unavailable(source) => Error::Unavailable { phase, source },
        StoreError::Unsupported(reason) => Error::NotTransactional { reason },
        StoreError::TransactionGone(reason) => Error::TransactionAborted {
            scope: scope.to_owned(),
            key: key.clone(),
            reason,
        },
    }
}

/// The claim of one call in the process `pid`: a new token, the handler's scope and ttl.
pub(crate) fn request<'a>(
    pid: u32,
    opts: &'a Options,
    key: &'a Key,
    fingerprint: Option<Fingerprint>,
) -> BeginRequest<'a> {
    BeginRequest {
        scope: &opts.scope,
        key,
        token: Token::generate_in(pid),
        ttl: opts.ttl,
        fingerprint,
    }
}

/// The span of one call: `idem.call`, with its scope; the (redacted) key, the outcome and the
/// fence are recorded on it as they are known (a call refused for its key has none). Opened
/// before anything can refuse the call, so no refusal is recorded on an enclosing call's span.
/// At `DEBUG`: an operator who wants a line per call turns it on; the store's own errors are
/// warnings either way.
pub(crate) fn call_span(opts: &Options) -> tracing::Span {
    tracing::debug_span!(
        "idem.call",
        scope = %opts.scope,
        key = tracing::field::Empty,
        outcome = tracing::field::Empty,
        fence = tracing::field::Empty,
    )
}

/// Record the call's key on its span, once it is known to be valid.
pub(crate) fn record_key(key: &Key) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("key", tracing::field::display(key));
    }
}

/// The plain form: lock, check, run `handler` while the watchdog renews the lease, then mark (or
/// release).
async fn execute<R, F, Fut>(store: &dyn Store, opts: &Options, call: Call, handler: F) -> R
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    let (key, fingerprint) = match call.into_parts() {
        Ok(parts) => parts,
        Err(e) => return lift(opts, e),
    };
    record_key(&key);
    execute_keyed(store, opts, key, fingerprint, handler).await
}

async fn execute_keyed<R, F, Fut>(
    store: &dyn Store,
    opts: &Options,
    key: Key,
    fingerprint: Option<Fingerprint>,
    handler: F,
) -> R
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    // Read once: the token and the watchdog both depend on it (a forked child has its own).
    let pid = std::process::id();
    let req = request(pid, opts, &key, fingerprint);
    let claiming = metrics::Timer::start();
    // The first claim is awaited here, in a small future: a duplicate (a replay, a refusal) is
    // answered without building the run's state, which holds the handler's future and is
    // copied at each level a future is moved through (a duplicate paid more for those copies
    // than for a cached answer). A granted call builds that state once, on the heap.
    let granted = match claim::<R>(store, Claimant::Store(store), opts, &req).await {
        Ok(granted) => granted,
        Err(Refusal::Answer(answer)) => {
            // A replay or a refusal is the claim's answer: timed as a claim too.
            claiming.stop(opts, "claim");
            return answer;
        }
        Err(Refusal::Shadow(would)) => {
            claiming.stop(opts, "claim");
            let shadowed = Box::pin(shadowed(opts, &key, would, handler()));
            return shadowed.await;
        }
    };
    // Bound first: a temporary in the awaiting statement would be kept in this future too.
    let granted = Box::pin(execute_granted(
        store, opts, pid, &key, &req, granted, claiming, handler,
    ));
    granted.await
}

/// [`execute_keyed`] once the store granted the key: run `handler` while the watchdog renews
/// the lease, then mark (or release).
#[allow(clippy::too_many_arguments)]
async fn execute_granted<R, F, Fut>(
    store: &dyn Store,
    opts: &Options,
    pid: u32,
    key: &Key,
    req: &BeginRequest<'_>,
    mut granted: Granted,
    claiming: metrics::Timer,
    handler: F,
) -> R
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce() -> Fut,
    Fut: Future<Output = R>,
{
    let mut round = 0;
    let (held, twin, mut guard) = loop {
        // Renewed from the watchdog's thread from the moment the store granted it (as far as
        // the caller can tell: when it asked), until the mark or the release is written; a drop
        // of this future finishes in the background (release, or the done mark once the
        // handler succeeded).
        let twin = store.for_watchdog();
        let held = Held::new(opts.scope.clone(), key.clone(), granted.lease);
        let watch = lease::watch(
            pid,
            &held,
            twin.clone(),
            opts.ttl,
            opts.max_lease,
            granted.asked,
        );
        let mut guard = Finish::holding(&held, Some(twin.clone()), Some(watch), opts);
        match confirm(&twin, &held, opts.ttl, granted.asked).await {
            Ok(()) => break (held, twin, guard),
            // Taken over before the handler started: nothing of ours to release; ask again (a
            // replay, or in flight).
            Err(StoreError::LeaseLost) if round + 1 < CONFIRM_ROUNDS => {
                guard.done();
                round += 1;
                granted = match claim::<R>(store, Claimant::Store(store), opts, req).await {
                    Ok(granted) => granted,
                    Err(Refusal::Answer(answer)) => {
                        claiming.stop(opts, "claim");
                        return answer;
                    }
                    Err(Refusal::Shadow(would)) => {
                        claiming.stop(opts, "claim");
                        return shadowed(opts, key, would, handler()).await;
                    }
                };
            }
            Err(StoreError::LeaseLost) => {
                guard.done();
                claiming.stop(opts, "claim");
                if crate::shadow() {
                    return shadowed(opts, key, Would::RefuseInFlight, handler()).await;
                }
                return lift(opts, taken_over(opts, key));
            }
            // The guard releases the claim in the background.
            Err(e) => {
                claiming.stop(opts, "claim");
                drop(guard);
                if crate::shadow() {
                    return shadowed(opts, key, Would::FailClosed, handler()).await;
                }
                return lift(opts, store_error(e, Phase::Begin, &opts.scope, key));
            }
        }
    };
    claiming.stop(opts, "claim");

    let lease = held.lease;
    tracing::Span::current().record("fence", lease.fence);
    tracing::trace!("handler started");
    let running = metrics::Timer::start();
    let outcome = held.scope(CatchUnwind { inner: handler() }).await;
    running.stop(opts, "handler");
    held.finishing();

    let (scope, key) = (&*held.scope, &held.key);
    let fence = Some(lease.fence);
    match outcome {
        Err(panic) => {
            metrics::record(opts, CallOutcome::Panicked, Some(key), fence);
            tracing::warn!("the handler panicked: releasing the key");
            release(store, Some(&twin), scope, key, &lease, opts.ttl).await;
            guard.done();
            resume_unwind(panic)
        }
        Ok(result) => match result.into_result() {
            Err(e) => {
                metrics::record(opts, CallOutcome::HandlerError, Some(key), fence);
                tracing::debug!("the handler failed: releasing the key");
                release(store, Some(&twin), scope, key, &lease, opts.ttl).await;
                guard.done();
                R::from_result(Err(e))
            }
            Ok(value) => {
                // From here on the effect has happened: never release, or a redelivery runs again.
                let output: Arc<[u8]> = encode_output(&value, opts, scope, key).into();
                guard.marking(output.clone());
                let marking = metrics::Timer::start();
                let marked =
                    complete(store, scope, key, &lease, &output, opts.ttl, opts.keep).await;
                marking.stop(opts, "mark");
                match marked {
                    Ok(()) => {
                        guard.done();
                        tracing::trace!("marked done");
                        metrics::record(opts, CallOutcome::Executed, Some(key), fence);
                        R::from_result(Ok(value))
                    }
                    Err(StoreError::Unavailable(e)) if crate::shadow() => {
                        // The guard goes on trying in the background; the caller gets what it
                        // would have got without idem.
                        tracing::error!(scope, key = %key, error = %e, "handler ran but its done mark was not written; retrying in the background");
                        mark_shadowed(opts, key, fence, value)
                    }
                    Err(e) if crate::shadow() => {
                        guard.done();
                        tracing::error!(scope, key = %key, error = %e, "handler ran but its done mark was refused");
                        mark_shadowed(opts, key, fence, value)
                    }
                    Err(StoreError::Unavailable(e)) => {
                        // The guard goes on trying in the background as this returns.
                        tracing::error!(scope, key = %key, error = %e, "handler ran but its done mark was not written; retrying in the background");
                        lift(
                            opts,
                            store_error(StoreError::Unavailable(e), Phase::Complete, scope, key),
                        )
                    }
                    Err(e) => {
                        guard.done();
                        tracing::error!(scope, key = %key, error = %e, "handler ran but its done mark was refused");
                        lift(opts, store_error(e, Phase::Complete, scope, key))
                    }
                }
            }
        },
    }
}

/// Shadow mode: run the handler although idem would have answered otherwise (`would`), holding
/// nothing and marking nothing, and report it.
pub(crate) async fn shadowed<R: Outcome, Fut: Future<Output = R>>(
    opts: &Options,
    key: &Key,
    would: Would,
    handler: Fut,
) -> R {
    tracing::info!(
        would = would.as_str(),
        "shadow mode: running the handler anyway"
    );
    let out = handler.await;
    metrics::record(opts, CallOutcome::Shadowed { would }, Some(key), None);
    out
}

/// Shadow mode, after a handler that succeeded but whose mark failed: without idem the caller
/// would have had the handler's `Ok`, and so it does (an error here would have the message
/// redelivered and the handler run again).
pub(crate) fn mark_shadowed<R: Outcome>(
    opts: &Options,
    key: &Key,
    fence: Option<u64>,
    value: R::Ok,
) -> R {
    metrics::record(
        opts,
        CallOutcome::Shadowed {
            would: Would::MarkFailed,
        },
        Some(key),
        fence,
    );
    R::from_result(Ok(value))
}

/// The output as stored. Once the handler succeeded its key must never be released, so a
/// `Serialize` that panics does not unwind through the wrapper: the key is marked done without
/// an output to replay (duplicates get [`Error::Unreplayable`]), and the caller still gets `v`.
pub(crate) fn encode_output<T: Serialize>(
    v: &T,
    opts: &Options,
    scope: &str,
    key: &Key,
) -> Vec<u8> {
    match catch_unwind(AssertUnwindSafe(|| codec::encode(v, opts.max_output))) {
        Ok(bytes) => bytes,
        Err(_panic) => {
            tracing::error!(scope, key = %key, "the output's Serialize panicked: the key is marked done without an output to replay");
            codec::unreplayable("the output's Serialize implementation panicked")
        }
    }
}

pin_project_lite::pin_project! {
    /// Turns a panic inside the handler into a value, so the lease is released before the panic
    /// resumes.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        pub(crate) inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
