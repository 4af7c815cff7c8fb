//! What the wrapper did, in one place: the report an enclosing [`observe`](crate::observe) gets,
//! the `outcome` and `fence` of the call's `idem.call` span, and, with the `metrics` feature,
//! counters and latency histograms through the `metrics` facade (install any exporter in the
//! application: Prometheus, StatsD, ...). Without the feature the metrics compile to nothing.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `idem_calls_total` | counter | `scope`, `outcome` | calls, by how they ended ([`CallOutcome::as_str`](crate::CallOutcome::as_str): `executed`, `replayed`, `in_flight`, `handler_error`, `store_unavailable`, ...) |
//! | `idem_phase_seconds` | histogram | `scope`, `phase` | time in `claim` (until the lease or the answer), `handler`, `mark` (the done mark) |
//! | `idem_store_errors_total` | counter | `scope`, `phase` | store failures, by protocol phase (`begin`, `complete`, `release`, `extend`) |
//! | `idem_renewals_total` | counter | `result` | lease renewals by the watchdog: `ok`, `failed` (retried), `lost` |
//! | `idem_lease_lost_total` | counter | `scope` | leases found lost while their handler ran |
//! | `idem_shadow_total` | counter | `scope`, `would` | calls shadow mode let through, by what idem would have done |
//! | `idem_store_degraded_total` | counter | `op` | layered store operations answered without the front |
//! | `idem_front_degraded` | gauge | | 1 while a layered store skips its front, 0 once it is back |

use crate::observe::{self, CallOutcome};
use crate::{Key, Options, Phase};

/// Count one finished call, hand its report to an enclosing `observe`, and note its outcome on
/// the call's span.
#[inline]
pub(crate) fn record(opts: &Options, outcome: CallOutcome, key: Option<&Key>, fence: Option<u64>) {
    note(opts, outcome, key, fence);
    count(opts, outcome);
}

/// Hand the report to an enclosing `observe` and note the outcome on the call's span.
#[inline]
pub(crate) fn note(opts: &Options, outcome: CallOutcome, key: Option<&Key>, fence: Option<u64>) {
    observe::deliver(opts, outcome, key, fence);
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("outcome", outcome.as_str());
    }
}

/// Count one finished call (`idem_calls_total`, and the counters its outcome implies).
#[inline]
pub(crate) fn count(opts: &Options, outcome: CallOutcome) {
    #[cfg(not(feature = "metrics"))]
    let _ = (opts, outcome);
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!("idem_calls_total", "scope" => scope(opts), "outcome" => outcome.as_str())
            .increment(1);
        if let CallOutcome::StoreUnavailable { phase } = outcome {
            store_error_in(&opts.scope, phase);
        }
        if let CallOutcome::Shadowed { would } = outcome {
            ::metrics::counter!("idem_shadow_total", "scope" => scope(opts), "would" => would.as_str())
                .increment(1);
        }
    }
}

/// Count a store failure in `phase` of a call in `scope` (where no `Options` are at hand).
#[inline]
pub(crate) fn store_error_in(scope: &str, phase: Phase) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!("idem_store_errors_total", "scope" => scope.to_owned(), "phase" => phase_label(phase))
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (scope, phase);
}

/// A renewal by the watchdog and how it went (`ok`, `failed`, `lost`).
#[inline]
pub(crate) fn renewal(result: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!("idem_renewals_total", "result" => result).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = result;
}

/// A lease found lost while its handler ran.
#[inline]
pub(crate) fn lease_lost(scope: &str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!("idem_lease_lost_total", "scope" => scope.to_owned()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = scope;
}

/// Whether a layered store is skipping its front (1) or back on it (0).
#[inline]
pub(crate) fn front_degraded(down: bool) {
    #[cfg(feature = "metrics")]
    ::metrics::gauge!("idem_front_degraded").set(if down { 1.0 } else { 0.0 });
    #[cfg(not(feature = "metrics"))]
    let _ = down;
}

/// A phase of one call being timed (`claim`, `handler`, `mark`): free without the feature.
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    start: std::time::Instant,
}

impl Timer {
    #[inline]
    pub(crate) fn start() -> Timer {
        Timer {
            #[cfg(feature = "metrics")]
            start: std::time::Instant::now(),
        }
    }

    #[inline]
    pub(crate) fn stop(self, opts: &Options, phase: &'static str) {
        #[cfg(feature = "metrics")]
        ::metrics::histogram!("idem_phase_seconds", "scope" => scope(opts), "phase" => phase)
            .record(self.start.elapsed().as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = (opts, phase);
    }
}

#[cfg(feature = "metrics")]
fn scope(opts: &Options) -> ::metrics::SharedString {
    // A `&'static str` scope (the macro's) is used without allocating.
    match &opts.scope {
        std::borrow::Cow::Borrowed(s) => ::metrics::SharedString::const_str(s),
        std::borrow::Cow::Owned(s) => s.clone().into(),
    }
}

#[cfg(feature = "metrics")]
fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Begin => "begin",
        Phase::Complete => "complete",
        Phase::Release => "release",
        Phase::Extend => "extend",
    }
}
