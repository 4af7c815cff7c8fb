//! What a call ended with, visible to its caller without changing the handler's signature: a
//! first run or a replay, a refusal because the key is in flight or a store outage. The broker
//! glue decides ack, redeliver or dead-letter from it ([`crate::ack`]); logs and metrics use the
//! same words.
//!
//! `observe(fut)` runs `fut` (anything that calls idempotent handlers) and returns, beside its
//! output, the [`Report`] of the last idempotent call that finished inside it: the outermost one
//! when calls nest.

use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use crate::{Error, Key, Options, Phase};

/// How one call of an idempotent handler ended, as the wrapper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallOutcome {
    /// The handler ran and its output was marked done: a first run.
    Executed,
    /// The key was done: the stored output was returned and the handler did not run.
    Replayed,
    /// The handler returned its own `Err`; the key was released, so a redelivery runs it again.
    HandlerError,
    /// The handler panicked; the key was released (the panic goes on to the caller).
    Panicked,
    /// Another caller holds the key right now; it is free at the latest after `retry_after`.
    /// The handler did not run. Never ack this as done: the holder may still fail.
    InFlight {
        /// When the holder's lease ends at the latest, as the store sees it.
        retry_after: Duration,
    },
    /// The key was done with another payload (fingerprint). The handler did not run.
    Mismatch,
    /// The store failed or did not answer in `phase`: in [`Phase::Begin`] the handler did not run
    /// (idem fails closed); in [`Phase::Complete`] it ran but its mark is not written yet.
    StoreUnavailable {
        /// The step that failed.
        phase: Phase,
    },
    /// The handler ran, but another caller had taken the key over before its mark.
    LeaseLost,
    /// A stored record could not be read back. The handler did not run.
    Corrupt,
    /// The key was done, but its output was not stored: nothing to replay. The handler did not
    /// run again.
    Unreplayable,
    /// The key was invalid (empty). The handler did not run.
    InvalidKey,
    /// A fingerprinted value could not be serialized. The handler did not run.
    InvalidFingerprint,
    /// The transactional form on a store or connection that cannot hold the mark.
    NotTransactional,
    /// The transactional form could not undo the handler's writes to its savepoint; the
    /// transaction was rolled back whole.
    TransactionAborted,
    /// No store was installed.
    NoStore,
    /// The transactional form owned the commit ([`SqlStore::run_in_tx`](crate::SqlStore::run_in_tx)):
    /// the handler ran and its mark was written in the transaction, but the commit failed, so
    /// neither the effect nor the mark exists. The caller gets
    /// [`Error::Unavailable`] in [`Phase::Complete`]; a redelivery runs the handler again.
    CommitFailed,
    /// Shadow mode ([`set_shadow`](crate::set_shadow)): the handler ran although idem would have
    /// answered otherwise (`would`); nothing was refused or replayed.
    Shadowed {
        /// What idem would have done without shadow mode.
        would: Would,
    },
}

/// What idem would have answered a call it let through in shadow mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Would {
    /// Replayed the done key's output instead of running the handler.
    Replay,
    /// Refused the call: another caller held the key.
    RefuseInFlight,
    /// Refused the call: the key was done with another payload.
    RefuseMismatch,
    /// Refused the call: the store did not answer (fail closed).
    FailClosed,
    /// Answered with idem's error although the handler succeeded: its done mark could not be
    /// written (the store failed after the handler ran). In shadow mode the caller gets the
    /// handler's `Ok`, as it would without idem.
    MarkFailed,
}

impl Would {
    /// The label used in logs and metrics.
    ///
    /// ```
    /// assert_eq!(idem_runtime::Would::Replay.as_str(), "replay");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Would::Replay => "replay",
            Would::RefuseInFlight => "refuse_in_flight",
            Would::RefuseMismatch => "refuse_mismatch",
            Would::FailClosed => "fail_closed",
            Would::MarkFailed => "mark_failed",
        }
    }
}

impl CallOutcome {
    /// The label used in logs and metrics (`idem_calls_total{outcome}`).
    ///
    /// ```
    /// assert_eq!(idem_runtime::CallOutcome::Replayed.as_str(), "replayed");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            CallOutcome::Executed => "executed",
            CallOutcome::Replayed => "replayed",
            CallOutcome::HandlerError => "handler_error",
            CallOutcome::Panicked => "panicked",
            CallOutcome::InFlight { .. } => "in_flight",
            CallOutcome::Mismatch => "mismatch",
            CallOutcome::StoreUnavailable { .. } => "store_unavailable",
            CallOutcome::LeaseLost => "lease_lost",
            CallOutcome::Corrupt => "corrupt",
            CallOutcome::Unreplayable => "unreplayable",
            CallOutcome::InvalidKey => "invalid_key",
            CallOutcome::InvalidFingerprint => "invalid_fingerprint",
            CallOutcome::NotTransactional => "not_transactional",
            CallOutcome::TransactionAborted => "transaction_aborted",
            CallOutcome::NoStore => "no_store",
            CallOutcome::CommitFailed => "commit_failed",
            CallOutcome::Shadowed { .. } => "shadowed",
        }
    }

    /// The outcome that one of idem's errors stands for.
    ///
    /// ```
    /// use idem_runtime::{CallOutcome, Error};
    /// assert_eq!(CallOutcome::of(&Error::NoStore), CallOutcome::NoStore);
    /// ```
    pub fn of(e: &Error) -> CallOutcome {
        match e {
            Error::InFlight { retry_after, .. } => CallOutcome::InFlight {
                retry_after: *retry_after,
            },
            Error::Mismatch { .. } => CallOutcome::Mismatch,
            Error::LeaseLost { .. } => CallOutcome::LeaseLost,
            Error::Unavailable { phase, .. } => CallOutcome::StoreUnavailable { phase: *phase },
            Error::InvalidKey { .. } => CallOutcome::InvalidKey,
            Error::InvalidFingerprint { .. } => CallOutcome::InvalidFingerprint,
            Error::Unreplayable { .. } => CallOutcome::Unreplayable,
            Error::NotTransactional { .. } => CallOutcome::NotTransactional,
            Error::Corrupt { .. } => CallOutcome::Corrupt,
            Error::TransactionAborted { .. } => CallOutcome::TransactionAborted,
            Error::NoStore => CallOutcome::NoStore,
        }
    }

    /// Whether the handler ran in this call (its effect may have happened).
    ///
    /// ```
    /// use idem_runtime::CallOutcome;
    /// assert!(CallOutcome::Executed.handler_ran());
    /// assert!(!CallOutcome::Replayed.handler_ran());
    /// ```
    pub fn handler_ran(&self) -> bool {
        matches!(
            self,
            CallOutcome::Executed
                | CallOutcome::HandlerError
                | CallOutcome::Panicked
                | CallOutcome::LeaseLost
                | CallOutcome::Shadowed { .. }
                | CallOutcome::CommitFailed
                | CallOutcome::StoreUnavailable {
                    phase: Phase::Complete
                }
        )
    }
}

/// What one call of an idempotent handler ended with, and what it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// How it ended.
    pub outcome: CallOutcome,
    /// The handler's scope.
    pub scope: Cow<'static, str>,
    /// The key, when the call got as far as having one. Its `Display` is redacted.
    pub key: Option<Key>,
    /// The fence of the lease the handler ran under, when it ran.
    pub fence: Option<u64>,
}

tokio::task_local! {
    static SLOT: RefCell<Option<Report>>;
}

/// Run `fut` and return, beside its output, the [`Report`] of the last idempotent call that
/// finished inside it (the outermost one when calls nest; `None` if none did). An enclosing
/// `observe` gets the same report. The handler and
/// its signature stay as they are: this is how a consumer loop, a log line or a metric tells a
/// first run from a replay, or an in-flight refusal from a store outage.
///
/// ```
/// use idem_runtime::{CallOutcome, MemoryStore, idempotent, observe};
///
/// #[idempotent(key = "order_id", store = "store")]
/// async fn issue_coupon(store: &MemoryStore, order_id: u64) -> Result<u64, idem_runtime::Error> {
///     Ok(order_id * 10)
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let (first, report) = observe(issue_coupon(&store, 7)).await;
/// assert_eq!((first.unwrap(), report.unwrap().outcome), (70, CallOutcome::Executed));
/// let (again, report) = observe(issue_coupon(&store, 7)).await;
/// assert_eq!((again.unwrap(), report.unwrap().outcome), (70, CallOutcome::Replayed));
/// # });
/// ```
pub async fn observe<F: Future>(fut: F) -> (F::Output, Option<Report>) {
    let (out, report) = SLOT
        .scope(RefCell::new(None), async move {
            let out = fut.await;
            let report = SLOT.with(|slot| slot.borrow_mut().take());
            (out, report)
        })
        .await;
    // An enclosing `observe` (the broker glue's, around a consumer that observes its own call)
    // sees the same report: an inner one must not take it away.
    if let Some(r) = &report {
        let _ = SLOT.try_with(|slot| *slot.borrow_mut() = Some(r.clone()));
    }
    (out, report)
}

/// Hand the report of a call that just ended to an enclosing [`observe`], if any.
pub(crate) fn deliver(opts: &Options, outcome: CallOutcome, key: Option<&Key>, fence: Option<u64>) {
    let _ = SLOT.try_with(|slot| {
        *slot.borrow_mut() = Some(Report {
            outcome,
            scope: opts.scope.clone(),
            key: key.cloned(),
            fence,
        });
    });
}
