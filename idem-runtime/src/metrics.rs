//! Counters of what the wrapper did, through the `metrics` facade (feature `metrics`): install any
//! exporter (Prometheus, StatsD, ...) in the application and they appear.
//!
//! `idem_calls_total{scope, outcome}`, where `outcome` is one of `executed` (the handler ran and
//! its output was marked done), `replayed`, `in_flight`, `mismatch`, `handler_error` (the handler
//! returned `Err`; the key was released), `panicked`, `store_unavailable`, `lease_lost`, `corrupt`,
//! `unreplayable`, `invalid_key`, `invalid_fingerprint`, `not_transactional`, `transaction_aborted`, `no_store`. Without the feature every call compiles to nothing.

/// What one call of the wrapper ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Executed,
    Replayed,
    InFlight,
    Mismatch,
    HandlerError,
    Panicked,
    StoreUnavailable,
    LeaseLost,
    Corrupt,
    InvalidKey,
    InvalidFingerprint,
    Unreplayable,
    NotTransactional,
    TransactionAborted,
    NoStore,
}

impl Outcome {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::InFlight => "in_flight",
            Outcome::Mismatch => "mismatch",
            Outcome::HandlerError => "handler_error",
            Outcome::Panicked => "panicked",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::LeaseLost => "lease_lost",
            Outcome::Corrupt => "corrupt",
            Outcome::InvalidKey => "invalid_key",
            Outcome::InvalidFingerprint => "invalid_fingerprint",
            Outcome::Unreplayable => "unreplayable",
            Outcome::NotTransactional => "not_transactional",
            Outcome::TransactionAborted => "transaction_aborted",
            Outcome::NoStore => "no_store",
        }
    }

    /// The outcome that an idem error stands for.
    pub(crate) fn of(e: &crate::Error) -> Outcome {
        use crate::Error;
        match e {
            Error::InFlight { .. } => Outcome::InFlight,
            Error::Mismatch { .. } => Outcome::Mismatch,
            Error::LeaseLost { .. } => Outcome::LeaseLost,
            Error::Unavailable { .. } => Outcome::StoreUnavailable,
            Error::InvalidKey { .. } => Outcome::InvalidKey,
            Error::InvalidFingerprint { .. } => Outcome::InvalidFingerprint,
            Error::Unreplayable { .. } => Outcome::Unreplayable,
            Error::NotTransactional { .. } => Outcome::NotTransactional,
            Error::Corrupt { .. } => Outcome::Corrupt,
            Error::TransactionAborted { .. } => Outcome::TransactionAborted,
            Error::NoStore => Outcome::NoStore,
        }
    }
}

/// Count one call.
#[inline]
pub(crate) fn record(opts: &crate::Options, outcome: Outcome) {
    #[cfg(feature = "metrics")]
    {
        // A `&'static str` scope (the macro's) is used without allocating.
        let scope: metrics::SharedString = match &opts.scope {
            std::borrow::Cow::Borrowed(s) => metrics::SharedString::const_str(s),
            std::borrow::Cow::Owned(s) => s.clone().into(),
        };
        metrics::counter!("idem_calls_total", "scope" => scope, "outcome" => outcome.as_str())
            .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (opts, outcome);
}
