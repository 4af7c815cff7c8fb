//! The front's health: whether calls use it, skip it, or probe it after a failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::LOG_EVERY;

/// Why a front operation has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Missed {
    /// The front is in its back-off: not called.
    Skipped,
    /// Called, and it failed or timed out (it may still have done the work).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The front is healthy.
    Use,
    /// The front failed and its back-off is over: this call tries it for everyone.
    Probe,
    /// The front failed recently: do not call it.
    Skip,
}

/// Whether calls use the front. Lock-free: one atomic load on the healthy path.
pub(super) struct Gate {
    epoch: Instant,
    /// 0 while the front is healthy; otherwise the end of its back-off, in nanoseconds since
    /// `epoch` (at least 1).
    pub(super) down_until: AtomicU64,
    /// Set while one call probes the front, so a dead front costs one timeout per back-off, not
    /// one per call.
    probing: AtomicBool,
    /// When the last warning was logged (ns since `epoch`, +1), and how many were held back.
    last_warn: AtomicU64,
    held_back: AtomicU64,
}

impl Gate {
    pub(super) fn new() -> Gate {
        Gate {
            epoch: Instant::now(),
            down_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            last_warn: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    pub(super) fn pass(&self) -> Pass {
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

    pub(super) fn failed(&self, pass: Pass, backoff: Duration, op: &str, error: &str) {
        let until = self
            .now()
            .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        crate::metrics::front_degraded(true);
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

    pub(super) fn recovered(&self) {
        crate::metrics::front_degraded(false);
        self.down_until.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        tracing::info!("idempotency front store answers again: back on the fast path");
    }

    /// Warn at most once per [`LOG_EVERY`], saying how many warnings were held back meanwhile.
    pub(super) fn warn(&self, op: &str, error: &str, backoff: Duration) {
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
pub(super) struct ProbeGuard<'a>(pub(super) &'a Gate);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}
