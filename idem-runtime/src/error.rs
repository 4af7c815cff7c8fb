//! The errors a caller can match on.

use std::time::Duration;

use crate::Key;

/// A boxed error from a store's client library, kept as the `source` of [`Error::Unavailable`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything idem itself can answer instead of running the handler (or after running it).
///
/// The handler's own error type absorbs this one through `From<idem_runtime::Error>`, so an
/// `#[idempotent]` function keeps its signature. Match on the variant to map it to the transport:
///
/// ```
/// use idem_runtime::Error;
///
/// fn http_status(e: &Error) -> u16 {
///     match e {
///         Error::InFlight { .. } => 409,
///         Error::Mismatch { .. } => 422,
///         Error::InvalidKey { .. } | Error::InvalidFingerprint { .. } => 400,
///         Error::Unavailable { .. } | Error::NoStore => 503,
///         _ => 500,
///     }
/// }
/// let key = idem_runtime::Key::new("order-1").unwrap();
/// assert_eq!(http_status(&Error::Mismatch { scope: "s".into(), key }), 422);
/// ```
///
/// Keys in these errors print as a short hash, not as the key (keys are often personal data);
/// the key itself is in the `key` field, and [`reveal_keys`](crate::reveal_keys) prints it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another holder is executing this key right now and its lease is alive. Try again after
    /// `retry_after` (MQ: redeliver later; HTTP: 409 with `Retry-After`). Never ack this as success:
    /// the holder may still fail.
    #[error(
        "key {key} in {scope} is being processed by another caller; retry after {retry_after:?}"
    )]
    InFlight {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
        /// When the current lease expires at the latest, as the store sees it.
        retry_after: Duration,
    },
    /// The key was completed with a different fingerprint: the same key was reused for another
    /// payload (HTTP: 422). The handler did not run and nothing was replayed.
    #[error("key {key} in {scope} was already used with a different payload")]
    Mismatch {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
    },
    /// This caller's lease was taken over by another holder (its ttl elapsed and it was not
    /// renewed in time, e.g. the store was unreachable, or it outlived its `max_lease`). The
    /// handler's effect may have happened, unless it ran in a transaction: the transactional form
    /// rolls that transaction back. The record of the new holder was left untouched.
    #[error("lease on key {key} in {scope} was lost to another holder before completion")]
    LeaseLost {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
    },
    /// The store could not be reached or answered with an error. In [`Phase::Begin`] the handler
    /// did not run (idem fails closed). In [`Phase::Complete`] the handler ran but its done mark
    /// was not written: idem keeps trying in the background; if that fails too, the lease expires
    /// after its ttl and a redelivery runs the handler again (the transactional form rolled the
    /// effect back instead).
    #[error("idempotency store unavailable during {phase}: {source}")]
    Unavailable {
        /// Which step failed.
        phase: Phase,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
    /// The key cannot be used (it is empty). Long keys are not an error: they are hashed.
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// Why the key was refused.
        reason: &'static str,
    },
    /// A value given for the fingerprint could not be serialized, so the payload cannot be
    /// checked. The handler did not run.
    #[error("invalid fingerprint: {reason}")]
    InvalidFingerprint {
        /// What could not be serialized.
        reason: String,
    },
    /// A stored record could not be read back (wrong format, or an output type that changed
    /// incompatibly between deploys). The handler did not run.
    #[error("corrupt idempotency record for key {key} in {scope}: {reason}")]
    Corrupt {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
        /// What could not be decoded.
        reason: String,
    },
    /// The key is done, but its output was not stored (larger than the handler's `max_output`,
    /// refused by the store, or not serializable), so there is nothing to replay. The handler did
    /// not run again: the effect happened once. (MQ: ack; HTTP: answer without the body.)
    #[error("key {key} in {scope} is done, but its output cannot be replayed: {reason}")]
    Unreplayable {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
        /// Why the output was not stored.
        reason: String,
    },
    /// The transactional form (`tx = "..."`, `run_in_tx`) was used with a store or a connection
    /// that cannot write the done mark in that transaction. The handler did not run.
    #[error("cannot write the done mark in this transaction: {reason}")]
    NotTransactional {
        /// What does not fit.
        reason: String,
    },
    /// The transactional form could not undo the handler's writes to its savepoint (after the
    /// handler failed, or its done mark could not be written), so idem rolled the **whole
    /// transaction** back on the server: **do not commit it**; roll it back and deliver again.
    /// Nothing of the handler's was kept, and the key is free again.
    #[error(
        "the transaction for key {key} in {scope} can no longer be committed: undoing the handler's writes to idem's savepoint failed ({reason}), so it was rolled back whole; roll it back"
    )]
    TransactionAborted {
        /// The scope of the key.
        scope: String,
        /// The key.
        key: Key,
        /// Why the savepoint could not be rolled back to.
        reason: String,
    },
    /// No store was given and none was installed with [`crate::install_default_store`].
    #[error(
        "no idempotency store installed: call idem_runtime::install_default_store(...) at start-up, or pass `store = \"...\"`"
    )]
    NoStore,
}

impl Error {
    /// A copy of an error a [`Call`](crate::Call) holds until it runs (a bad key or fingerprint).
    #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
    pub(crate) fn again(&self) -> Error {
        match self {
            Error::InvalidKey { reason } => Error::InvalidKey { reason },
            Error::InvalidFingerprint { reason } => Error::InvalidFingerprint {
                reason: reason.clone(),
            },
            other => Error::InvalidFingerprint {
                reason: other.to_string(),
            },
        }
    }

    /// The key the error is about, when it is about one.
    ///
    /// ```
    /// # use idem_runtime::{Error, Key};
    /// let e = Error::LeaseLost { scope: "s".into(), key: Key::new("k").unwrap() };
    /// assert_eq!(e.key().unwrap().as_str(), "k");
    /// ```
    pub fn key(&self) -> Option<&Key> {
        match self {
            Error::InFlight { key, .. }
            | Error::Mismatch { key, .. }
            | Error::LeaseLost { key, .. }
            | Error::Corrupt { key, .. }
            | Error::Unreplayable { key, .. }
            | Error::TransactionAborted { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The step of the protocol in which a store error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Claiming the key (or reading its record). The handler did not run.
    Begin,
    /// Writing the done mark after the handler succeeded. The handler ran.
    Complete,
    /// Releasing the key after the handler failed.
    Release,
    /// Renewing the lease while the handler runs.
    Extend,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Begin => "begin",
            Phase::Complete => "complete",
            Phase::Release => "release",
            Phase::Extend => "extend",
        })
    }
}

/// What a [`Store`](crate::Store) operation can fail with. The wrapper turns it into an [`Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The token does not own the key any more (it expired and was taken over, or was released).
    #[error("lease lost")]
    LeaseLost,
    /// The store holds something for this key it cannot interpret.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The store could not be reached or failed.
    #[error(transparent)]
    Unavailable(BoxError),
    /// The store cannot do what was asked with what it was given (e.g. a transaction on another
    /// database than the store's): a mistake in the program, not a passing failure.
    #[error("{0}")]
    Unsupported(String),
    /// The caller's transaction is gone on the server (rolled back: a deadlock, a failed
    /// statement, an earlier `TransactionAborted`), so nothing written through it can commit.
    #[error("the transaction is no longer open on the server: {0}")]
    TransactionGone(String),
}

impl StoreError {
    /// Wrap any client error as [`StoreError::Unavailable`].
    ///
    /// ```
    /// let e = idem_runtime::StoreError::unavailable(std::io::Error::other("connection refused"));
    /// assert!(matches!(e, idem_runtime::StoreError::Unavailable(_)));
    /// ```
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        StoreError::Unavailable(e.into())
    }
}
