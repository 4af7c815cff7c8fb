//! One ack decision for every broker: what a consumer does with a delivery, from how its
//! idempotent call ended ([`Report`](crate::Report), see [`observe`](crate::observe)) and how
//! many times its handler has failed on that message. The broker glue (RabbitMQ, NATS JetStream,
//! RocketMQ, Kafka) maps the [`Decision`] to its own verbs; the rule is the same everywhere:
//!
//! | the call | decision | why |
//! |---|---|---|
//! | ran and was marked done (`Executed`), or replayed a done key (`Replayed`), and the consumer's future returned `Ok` | [`Decision::Ack`] | the effect happened once |
//! | `Executed` or `Replayed`, but the consumer's future returned `Err` after it (its transaction's commit failed) | as a failed handler, below | nothing is acked that did not commit |
//! | the key is in flight elsewhere (`InFlight { retry_after }`) | [`Decision::Retry`] after `retry_after`, bounded by [`Policy::in_flight_min`]/[`in_flight_max`](Policy::in_flight_max), backed off per deferral | the holder may still fail: never ack it; and never count it as a failure of the message |
//! | the store did not answer (`StoreUnavailable`), the mark was not written, the lease was lost (`LeaseLost`), the transaction was rolled back (`TransactionAborted`) | [`Decision::Retry`], backed off | nothing is lost by waiting; the redelivery finds the truth (a replay, or a run) |
//! | the handler failed (its own `Err`, or a panic), attempt `n` | [`Decision::Retry`] after [`Policy::backoff`] × 2<sup>n-1</sup> while `n` < [`Policy::max_attempts`], then [`Decision::DeadLetter`] | the application's policy |
//! | the key was done with another payload (`Mismatch`), a record does not decode (`Corrupt`), the key or fingerprint is invalid, the store cannot do the transactional form, no store is installed | [`Decision::DeadLetter`] at once | a redelivery would be answered the same way |
//! | `run_in_tx` ran the handler and wrote its mark, but the commit failed (`CommitFailed`) | as a failed handler | neither the effect nor the mark exists |
//! | done, but the output was not stored (`Unreplayable`), and the consumer's future returned `Ok` | [`Decision::Ack`] (or dead letter, [`Policy::dead_letter_unreplayable`]) | the effect happened once; only the output is missing |
//! | `Unreplayable`, and the consumer's future returned `Err` | as a failed handler (dead letter at once with [`Policy::dead_letter_unreplayable`]) | the consumer said it failed: what it did after the call is retried |
//!
//! ```
//! use idem_runtime::ack::{Decision, DeadLetterReason, Policy};
//! use idem_runtime::CallOutcome;
//!
//! let policy = Policy::default();
//! assert_eq!(policy.decide(Some(CallOutcome::Replayed), true, 1, 0), Decision::Ack);
//! assert!(matches!(
//!     policy.decide(Some(CallOutcome::Mismatch), false, 1, 0),
//!     Decision::DeadLetter { reason: DeadLetterReason::Mismatch }
//! ));
//! ```

use std::time::Duration;

use crate::{CallOutcome, Phase};

/// What a consumer does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Acknowledge (commit the offset): the message is done with.
    Ack,
    /// Deliver it again after `after` (a delayed redelivery, never a busy loop).
    Retry {
        /// How long to wait first.
        after: Duration,
        /// Why.
        reason: RetryReason,
    },
    /// Move it to the dead-letter queue (topic, subject), with a log line saying why.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
    },
}

/// Why a delivery is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryReason {
    /// Another caller holds the key: not a failure of this message.
    InFlight,
    /// The store did not answer; the handler did not run.
    StoreUnavailable,
    /// The handler ran, but its done mark is not written yet, or its lease was taken over, or its
    /// transaction was rolled back: the redelivery replays or runs, whichever is true by then.
    Unsettled,
    /// The handler failed; this was failure number `attempt`.
    HandlerFailed {
        /// The failures so far, this one included.
        attempt: u32,
    },
}

/// Why a delivery is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The key was done with another payload: the same key reused for another message.
    Mismatch,
    /// A stored record could not be read back.
    Corrupt,
    /// The message's key (or its fingerprinted payload) is invalid.
    InvalidKey,
    /// The store cannot do what the handler asks (the transactional form), or none is installed:
    /// a mistake in the program, which every redelivery would meet again.
    Misconfigured,
    /// The key is done, but its output was not stored (only with
    /// [`Policy::dead_letter_unreplayable`]).
    Unreplayable,
    /// The handler failed `attempts` times.
    HandlerFailed {
        /// How many times.
        attempts: u32,
    },
}

impl RetryReason {
    /// The label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryReason::InFlight => "in_flight",
            RetryReason::StoreUnavailable => "store_unavailable",
            RetryReason::Unsettled => "unsettled",
            RetryReason::HandlerFailed { .. } => "handler_failed",
        }
    }
}

impl DeadLetterReason {
    /// The label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadLetterReason::Mismatch => "mismatch",
            DeadLetterReason::Corrupt => "corrupt",
            DeadLetterReason::InvalidKey => "invalid_key",
            DeadLetterReason::Misconfigured => "misconfigured",
            DeadLetterReason::Unreplayable => "unreplayable",
            DeadLetterReason::HandlerFailed { .. } => "handler_failed",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadLetterReason::Mismatch => {
                f.write_str("the key was already used with another payload")
            }
            DeadLetterReason::Corrupt => f.write_str("the key's stored record does not decode"),
            DeadLetterReason::InvalidKey => f.write_str("the message's key or payload is invalid"),
            DeadLetterReason::Misconfigured => {
                f.write_str("the store cannot serve this handler (configuration)")
            }
            DeadLetterReason::Unreplayable => {
                f.write_str("the key is done but its output was not stored")
            }
            DeadLetterReason::HandlerFailed { attempts } => {
                write!(f, "the handler failed {attempts} times")
            }
        }
    }
}

/// The application's part of the decision: how often a failing handler is retried, and how
/// redeliveries are spaced. Build it with [`Policy::default`] and the setters.
///
/// ```
/// use std::time::Duration;
/// let policy = idem_runtime::ack::Policy::default()
///     .max_attempts(3)
///     .backoff(Duration::from_secs(2), Duration::from_secs(60));
/// assert_eq!(policy.max_attempts, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policy {
    /// Handler failures a message may have before it is dead-lettered (default 5).
    pub max_attempts: u32,
    /// The pause before the first redelivery of a failed (or unsettled) message; doubled for each
    /// failure after it, up to [`max_backoff`](Self::max_backoff) (default 1 s).
    pub backoff: Duration,
    /// The longest pause between redeliveries (default 60 s).
    pub max_backoff: Duration,
    /// The shortest pause before an in-flight duplicate is tried again (default 100 ms).
    pub in_flight_min: Duration,
    /// The longest pause before an in-flight duplicate is tried again, whatever lease the holder
    /// has left (default 30 s): a holder that finishes early is noticed within it.
    pub in_flight_max: Duration,
    /// Dead-letter a delivery whose key is done without a stored output, instead of acking it
    /// (default `false`: the effect happened once, and only the output is missing).
    pub dead_letter_unreplayable: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            in_flight_min: Duration::from_millis(100),
            in_flight_max: Duration::from_secs(30),
            dead_letter_unreplayable: false,
        }
    }
}

impl Policy {
    /// Handler failures tolerated before the dead letter (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The first pause between redeliveries, and the longest.
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        // A zero pause would redeliver at once, every time: the busy loop this module exists
        // to prevent.
        let first = first.max(Duration::from_millis(1));
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// Bounds on the pause before an in-flight duplicate is tried again.
    pub fn in_flight(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.in_flight_min = min;
        self.in_flight_max = max.max(min);
        self
    }

    /// Dead-letter deliveries whose key is done without a stored output.
    pub fn dead_letter_unreplayable(mut self, yes: bool) -> Self {
        self.dead_letter_unreplayable = yes;
        self
    }

    /// The decision for one delivery: `outcome` is how its idempotent call ended (`None`: no
    /// idempotent call reported, so only `handler_ok` counts), `handler_ok` whether the call
    /// returned `Ok`, `attempt` the number of this delivery among the handler's runs of it that
    /// failed or may fail (1 for the first; the glue counts, never counting in-flight deferrals),
    /// and `deferrals` how many times this message was already deferred as in flight or
    /// unsettled (for the back-off).
    pub fn decide(
        &self,
        outcome: Option<CallOutcome>,
        handler_ok: bool,
        attempt: u32,
        deferrals: u32,
    ) -> Decision {
        let failed = |attempt: u32| {
            if attempt >= self.max_attempts {
                Decision::DeadLetter {
                    reason: DeadLetterReason::HandlerFailed { attempts: attempt },
                }
            } else {
                Decision::Retry {
                    after: self.backed_off(attempt.saturating_sub(1)),
                    reason: RetryReason::HandlerFailed { attempt },
                }
            }
        };
        let attempt = attempt.max(1);
        match outcome {
            None | Some(CallOutcome::Shadowed { .. }) if handler_ok => Decision::Ack,
            None | Some(CallOutcome::Shadowed { .. }) => failed(attempt),
            Some(CallOutcome::Executed | CallOutcome::Replayed) if handler_ok => Decision::Ack,
            // The idempotent call was done, but what the consumer did after it failed (e.g. the
            // commit of the transaction it ran in): nothing may be acked that did not commit.
            Some(CallOutcome::Executed | CallOutcome::Replayed) => failed(attempt),
            Some(CallOutcome::HandlerError | CallOutcome::Panicked) => failed(attempt),
            Some(CallOutcome::InFlight { retry_after }) => {
                let grown = self
                    .in_flight_min
                    .saturating_mul(1 << deferrals.min(16))
                    .min(self.in_flight_max);
                Decision::Retry {
                    after: retry_after.min(grown).max(self.in_flight_min),
                    reason: RetryReason::InFlight,
                }
            }
            Some(CallOutcome::StoreUnavailable {
                phase: Phase::Begin,
            }) => Decision::Retry {
                after: self.backed_off(deferrals),
                reason: RetryReason::StoreUnavailable,
            },
            Some(
                CallOutcome::StoreUnavailable { .. }
                | CallOutcome::LeaseLost
                | CallOutcome::TransactionAborted,
            ) => Decision::Retry {
                after: self.backed_off(deferrals),
                reason: RetryReason::Unsettled,
            },
            Some(CallOutcome::Unreplayable) if self.dead_letter_unreplayable => {
                Decision::DeadLetter {
                    reason: DeadLetterReason::Unreplayable,
                }
            }
            // Done once, only its output is missing: the consumer went on (ack), or what it
            // did next failed, which is retried as any failure is.
            Some(CallOutcome::Unreplayable) if handler_ok => Decision::Ack,
            Some(CallOutcome::Unreplayable) => failed(attempt),
            // The handler's writes and its mark were rolled back together: run it again, and
            // dead-letter a commit that keeps failing as a handler that keeps failing.
            Some(CallOutcome::CommitFailed) => failed(attempt),
            Some(CallOutcome::Mismatch) => Decision::DeadLetter {
                reason: DeadLetterReason::Mismatch,
            },
            Some(CallOutcome::Corrupt) => Decision::DeadLetter {
                reason: DeadLetterReason::Corrupt,
            },
            Some(CallOutcome::InvalidKey | CallOutcome::InvalidFingerprint) => {
                Decision::DeadLetter {
                    reason: DeadLetterReason::InvalidKey,
                }
            }
            Some(CallOutcome::NotTransactional | CallOutcome::NoStore) => Decision::DeadLetter {
                reason: DeadLetterReason::Misconfigured,
            },
        }
    }

    /// `backoff` doubled `n` times, at most `max_backoff`.
    fn backed_off(&self, n: u32) -> Duration {
        self.backoff
            .saturating_mul(1 << n.min(20))
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn p() -> Policy {
        Policy::default()
    }

    #[test]
    fn done_or_replayed_is_acked() {
        assert_eq!(
            p().decide(Some(CallOutcome::Executed), true, 1, 0),
            Decision::Ack
        );
        assert_eq!(
            p().decide(Some(CallOutcome::Replayed), true, 3, 2),
            Decision::Ack
        );
    }

    #[test]
    fn a_failure_after_the_call_is_not_acked() {
        // E.g. the transactional form's caller could not commit.
        assert!(matches!(
            p().decide(Some(CallOutcome::Executed), false, 1, 0),
            Decision::Retry {
                reason: RetryReason::HandlerFailed { attempt: 1 },
                ..
            }
        ));
    }

    #[test]
    fn a_failed_commit_is_retried_as_a_failure() {
        assert!(matches!(
            p().decide(Some(CallOutcome::CommitFailed), false, 1, 0),
            Decision::Retry {
                reason: RetryReason::HandlerFailed { attempt: 1 },
                ..
            }
        ));
        assert!(matches!(
            p().decide(Some(CallOutcome::CommitFailed), false, 5, 0),
            Decision::DeadLetter {
                reason: DeadLetterReason::HandlerFailed { attempts: 5 }
            }
        ));
    }

    #[test]
    fn zero_pauses_are_raised_to_a_millisecond() {
        let policy = Policy::default()
            .backoff(Duration::ZERO, Duration::ZERO)
            .in_flight(Duration::ZERO, Duration::ZERO);
        assert_eq!(policy.backoff, Duration::from_millis(1));
        assert_eq!(policy.in_flight_min, Duration::from_millis(1));
    }

    #[test]
    fn in_flight_is_retried_after_retry_after_bounded_and_backed_off_never_a_failure() {
        let d = |retry_after, deferrals| {
            p().decide(
                Some(CallOutcome::InFlight { retry_after }),
                false,
                1,
                deferrals,
            )
        };
        let after = |d: Decision| match d {
            Decision::Retry {
                after,
                reason: RetryReason::InFlight,
            } => after,
            other => panic!("{other:?}"),
        };
        // The holder's lease bounds it from above, the policy's minimum from below.
        assert_eq!(
            after(d(Duration::from_millis(10), 0)),
            Duration::from_millis(100)
        );
        // Backed off per deferral: 100 ms, 200 ms, 400 ms ...
        assert_eq!(after(d(60 * S, 0)), Duration::from_millis(100));
        assert_eq!(after(d(60 * S, 2)), Duration::from_millis(400));
        // ... up to the policy's maximum, whatever lease is left.
        assert_eq!(after(d(600 * S, 30)), 30 * S);
        assert_eq!(after(d(2 * S, 30)), 2 * S);
        // However many times it was deferred, it is never dead-lettered.
        assert!(matches!(d(S, 1000), Decision::Retry { .. }));
    }

    #[test]
    fn a_store_outage_is_retried_later() {
        let d = p().decide(
            Some(CallOutcome::StoreUnavailable {
                phase: Phase::Begin,
            }),
            false,
            1,
            3,
        );
        assert_eq!(
            d,
            Decision::Retry {
                after: 8 * S,
                reason: RetryReason::StoreUnavailable
            }
        );
    }

    #[test]
    fn an_unsettled_run_is_retried_not_acked() {
        for o in [
            CallOutcome::StoreUnavailable {
                phase: Phase::Complete,
            },
            CallOutcome::LeaseLost,
            CallOutcome::TransactionAborted,
        ] {
            assert!(
                matches!(
                    p().decide(Some(o), false, 1, 0),
                    Decision::Retry {
                        reason: RetryReason::Unsettled,
                        ..
                    }
                ),
                "{o:?}"
            );
        }
    }

    #[test]
    fn a_failing_handler_is_retried_then_dead_lettered() {
        let policy = p().max_attempts(3).backoff(S, 10 * S);
        let d = |attempt| policy.decide(Some(CallOutcome::HandlerError), false, attempt, 0);
        assert_eq!(
            d(1),
            Decision::Retry {
                after: S,
                reason: RetryReason::HandlerFailed { attempt: 1 }
            }
        );
        assert_eq!(
            d(2),
            Decision::Retry {
                after: 2 * S,
                reason: RetryReason::HandlerFailed { attempt: 2 }
            }
        );
        assert_eq!(
            d(3),
            Decision::DeadLetter {
                reason: DeadLetterReason::HandlerFailed { attempts: 3 }
            }
        );
        // A panic counts as a failure; so does an `Err` from a handler idem did not report.
        assert!(matches!(
            policy.decide(Some(CallOutcome::Panicked), false, 3, 0),
            Decision::DeadLetter { .. }
        ));
        assert!(matches!(
            policy.decide(None, false, 1, 0),
            Decision::Retry { .. }
        ));
        assert_eq!(policy.decide(None, true, 1, 0), Decision::Ack);
    }

    #[test]
    fn poison_messages_are_dead_lettered_at_once() {
        for (o, reason) in [
            (CallOutcome::Mismatch, DeadLetterReason::Mismatch),
            (CallOutcome::Corrupt, DeadLetterReason::Corrupt),
            (CallOutcome::InvalidKey, DeadLetterReason::InvalidKey),
            (
                CallOutcome::InvalidFingerprint,
                DeadLetterReason::InvalidKey,
            ),
            (
                CallOutcome::NotTransactional,
                DeadLetterReason::Misconfigured,
            ),
            (CallOutcome::NoStore, DeadLetterReason::Misconfigured),
        ] {
            assert_eq!(
                p().decide(Some(o), false, 1, 0),
                Decision::DeadLetter { reason },
                "{o:?}"
            );
        }
    }

    #[test]
    fn unreplayable_is_acked_unless_the_policy_dead_letters_it() {
        assert_eq!(
            p().decide(Some(CallOutcome::Unreplayable), true, 1, 0),
            Decision::Ack
        );
        // The consumer went on and failed after the call: retried, never acked.
        assert!(matches!(
            p().decide(Some(CallOutcome::Unreplayable), false, 1, 0),
            Decision::Retry {
                reason: RetryReason::HandlerFailed { attempt: 1 },
                ..
            }
        ));
        assert_eq!(
            p().dead_letter_unreplayable(true)
                .decide(Some(CallOutcome::Unreplayable), false, 1, 0),
            Decision::DeadLetter {
                reason: DeadLetterReason::Unreplayable
            }
        );
    }

    #[test]
    fn shadowed_calls_follow_the_handler() {
        let shadowed = Some(CallOutcome::Shadowed {
            would: crate::Would::Replay,
        });
        assert_eq!(p().decide(shadowed, true, 1, 0), Decision::Ack);
        assert!(matches!(
            p().decide(shadowed, false, 1, 0),
            Decision::Retry { .. }
        ));
    }
}
