//! [`Glue`]: one JetStream message, one idempotent call, one decision carried out.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind, Message};
use futures_util::FutureExt as _;
use idem_runtime::ack::{DeadLetterReason, Decision, Policy, RetryReason};
use idem_runtime::{CallOutcome, Report, observe};
use tokio::time::Instant;

use crate::dead_letter;
use crate::error::Error;
use crate::progress::Heartbeat;
use crate::telemetry;

/// What [`Glue::settle`] did with a message: log it or count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// Acknowledged (`+ACK`): the effect happened once. `outcome` is how the idempotent call
    /// ended (`Executed`, `Replayed`, `Unreplayable`; `None` when the caller's future made no
    /// idempotent call), `held` how many times the message was held in-process first because
    /// its key was in flight elsewhere (or the store did not answer, or the mark was unsettled).
    Acked {
        /// How the call ended.
        outcome: Option<CallOutcome>,
        /// In-process holds before the ack.
        held: u32,
    },
    /// The handler failed (`attempt` failures so far): negatively acknowledged with a delay
    /// (`-NAK {"delay": ...}`), so JetStream redelivers it after `after`.
    Redelivering {
        /// The delay asked for.
        after: Duration,
        /// The handler's failures on this message, this one included.
        attempt: u32,
    },
    /// Published to the dead-letter subject (and kept by the stream that captures it), then
    /// terminated (`+TERM`): JetStream never delivers it again.
    DeadLettered {
        /// Why.
        reason: DeadLetterReason,
    },
}

impl Settled {
    /// A label for logs and metrics: `acked`, `redelivering` or `dead_lettered`.
    ///
    /// ```
    /// use idem_nats::Settled;
    /// let s = Settled::Acked { outcome: None, held: 0 };
    /// assert_eq!(s.as_str(), "acked");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            Settled::Acked { .. } => "acked",
            Settled::Redelivering { .. } => "redelivering",
            Settled::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// The glue between a JetStream pull consumer and idem: it runs the caller's future for one
/// message, takes the [`Decision`] of [`Policy::decide`] from how its idempotent call ended,
/// and carries it out with JetStream's verbs (see the [crate docs](crate) for the table).
///
/// ```no_run
/// # async fn f(consumer: async_nats::jetstream::consumer::PullConsumer) {
/// let glue = idem_nats::Glue::new(&consumer)
///     .policy(idem_runtime::ack::Policy::default().max_attempts(3))
///     .dead_letter_subject_to("orders.dead-letters");
/// assert_eq!(glue.dead_letter_subject(), "orders.dead-letters");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Glue {
    policy: Policy,
    stream: String,
    /// The consumer's `max_deliver` as the server answered last (0: unlimited), shared by the
    /// clones: the fallback when the server does not answer.
    max_deliver: Arc<AtomicU32>,
    ack_wait: Duration,
    progress_every: Duration,
    max_progress: Duration,
    dead_letter_subject: String,
    double_ack: bool,
    failures: Arc<Failures>,
}

/// The handler failures this glue (and its clones) saw per message, keyed by stream, consumer
/// and stream sequence: JetStream's `num_delivered` also counts the deliveries a consumer that
/// died (or closed) returned unstarted after `ack_wait`, which are no failures.
#[derive(Debug, Default)]
struct Failures {
    seen: Mutex<HashMap<(String, String, u64), u32>>,
}

/// At most this many messages are remembered (a message that failed here and was then delivered
/// to another process is never settled here): past it, the oldest half is forgotten.
const MAX_REMEMBERED: usize = 65_536;

/// The longest the glue waits for the consumer's info after a failure.
const MAX_INFO_WAIT: Duration = Duration::from_secs(5);

impl Failures {
    fn get(&self, key: &(String, String, u64)) -> u32 {
        self.seen
            .lock()
            .map_or(0, |seen| seen.get(key).copied().unwrap_or(0))
    }

    fn record(&self, key: (String, String, u64), failures: u32) {
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() >= MAX_REMEMBERED && !seen.contains_key(&key) {
                // The lowest stream sequences are the oldest messages.
                let mut seqs: Vec<u64> = seen.keys().map(|k| k.2).collect();
                seqs.sort_unstable();
                let cut = seqs[seqs.len() / 2];
                seen.retain(|k, _| k.2 > cut);
            }
            seen.insert(key, failures);
        }
    }

    fn forget(&self, key: &(String, String, u64)) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.remove(key);
        }
    }
}

impl Glue {
    /// The glue for `consumer`'s messages, with the consumer's `ack_wait` (as its cached info has
    /// it; `max_deliver` is asked of the server again after each failure) and the default
    /// [`Policy`]. Dead letters go to
    /// `idem.dead.<stream>`; progress is signalled every third of `ack_wait`.
    ///
    /// ```no_run
    /// # async fn f(js: async_nats::jetstream::Context) -> Result<(), async_nats::Error> {
    /// let consumer: async_nats::jetstream::consumer::PullConsumer =
    ///     js.get_stream("ORDERS").await?.get_consumer("coupons").await?;
    /// let glue = idem_nats::Glue::new(&consumer);
    /// assert_eq!(glue.dead_letter_subject(), "idem.dead.ORDERS");
    /// # Ok(()) }
    /// ```
    pub fn new(consumer: &PullConsumer) -> Glue {
        let info = consumer.cached_info();
        let ack_wait = match info.config.ack_wait {
            Duration::ZERO => Duration::from_secs(30), // the server's default
            d => d,
        };
        Glue {
            policy: Policy::default(),
            stream: info.stream_name.clone(),
            max_deliver: Arc::new(AtomicU32::new(
                u32::try_from(info.config.max_deliver).unwrap_or(0),
            )),
            ack_wait,
            progress_every: ack_wait / 3,
            max_progress: Duration::from_secs(3600),
            dead_letter_subject: format!("idem.dead.{}", info.stream_name),
            double_ack: true,
            failures: Arc::default(),
        }
    }

    /// The decision table's application part: attempts before the dead letter, back-off.
    pub fn policy(mut self, policy: Policy) -> Glue {
        self.policy = policy;
        self
    }

    /// Where dead letters are published. A stream must capture it (see
    /// [`ensure_dead_letter_stream`](Self::ensure_dead_letter_stream)); the consumed stream
    /// must not.
    pub fn dead_letter_subject(&self) -> &str {
        &self.dead_letter_subject
    }

    /// Publish dead letters to `subject` instead of `idem.dead.<stream>`.
    pub fn dead_letter_subject_to(mut self, subject: impl Into<String>) -> Glue {
        self.dead_letter_subject = subject.into();
        self
    }

    /// How often `+WPI` is sent while a message is in hand (default: a third of `ack_wait`).
    pub fn progress_every(mut self, every: Duration) -> Glue {
        self.progress_every = every.max(Duration::from_millis(10));
        self
    }

    /// The longest one run of the caller's future is kept alive with progress signals (default
    /// 1 h, idem's default `max_lease`): past it JetStream redelivers the message after
    /// `ack_wait`, so a wedged caller does not hold it for ever.
    pub fn max_progress(mut self, max: Duration) -> Glue {
        self.max_progress = max;
        self
    }

    /// Wait for the server to confirm every `+ACK` and `+TERM` (default `true`), so that
    /// [`Settled::Acked`] means the server has it. `false` sends them without waiting: a lost
    /// ack then costs a redelivery, which idem answers with a replay.
    pub fn double_ack(mut self, yes: bool) -> Glue {
        self.double_ack = yes;
        self
    }

    /// The consumer's `ack_wait`, as the glue uses it.
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// Create the stream that keeps the dead letters, `<stream>_DEAD` capturing
    /// [`dead_letter_subject`](Self::dead_letter_subject), unless a stream of that name exists.
    ///
    /// ```no_run
    /// # async fn f(js: async_nats::jetstream::Context, glue: idem_nats::Glue) -> Result<(), async_nats::Error> {
    /// glue.ensure_dead_letter_stream(&js).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_dead_letter_stream(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::stream::Stream, async_nats::Error> {
        let config = jetstream::stream::Config {
            name: format!("{}_DEAD", self.stream),
            subjects: vec![self.dead_letter_subject.clone()],
            ..Default::default()
        };
        Ok(js.get_or_create_stream(config).await?)
    }

    /// Run `call` for `msg` and settle it: `+ACK` once the call is done (after the caller's own
    /// commit, when it returns `Ok` only then), hold it in-process while its key is in flight
    /// elsewhere, `-NAK` with a delay after a handler failure, dead-letter and `+TERM` it when
    /// a redelivery cannot help. `call` makes the caller's future (the business key comes from
    /// the message's body or headers, never its message id); it is called again only while the
    /// message is held (the key was in flight, the store did not answer, the mark was
    /// unsettled), never after it ran and failed. A panic in it counts as a handler failure.
    ///
    /// The caller's error is not logged (it may hold the key in plain text): log it inside
    /// `call` if you want it.
    ///
    /// ```no_run
    /// use futures_util::StreamExt as _;
    /// use idem_runtime::idempotent;
    ///
    /// #[idempotent(key = "order_id", scope = "coupons.issue")]
    /// async fn issue_coupon(order_id: u64) -> Result<u64, idem_runtime::Error> {
    ///     Ok(order_id * 10)
    /// }
    ///
    /// # async fn f(consumer: async_nats::jetstream::consumer::PullConsumer) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// let glue = idem_nats::Glue::new(&consumer);
    /// let mut messages = consumer.messages().await?;
    /// while let Some(message) = messages.next().await {
    ///     let message = message?;
    ///     let order_id: u64 = std::str::from_utf8(&message.payload)?.parse()?;
    ///     glue.settle(message, || issue_coupon(order_id)).await?; // instead of message.ack()
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn settle<T, E, F, Fut>(&self, msg: Message, mut call: F) -> Result<Settled, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some((delivered, id)) = delivery_count(&msg) else {
            tracing::warn!(
                subject = %msg.subject,
                "idem-nats: not a JetStream message (no ack subject): not run, not settled"
            );
            return Err(Error::NotJetStream);
        };
        // JetStream's `num_delivered` also counts deliveries returned unstarted (a consumer that
        // died holding its pull batch or a held duplicate): the failures are the ones the glue
        // saw and `-NAK`ed, never more than the deliveries.
        let attempt = self.failures.get(&id).saturating_add(1).min(delivered);
        let mut held = 0u32;
        let mut beat = Heartbeat::new(self.progress_every);
        loop {
            let until = Instant::now() + self.max_progress;
            let run = observe(AssertUnwindSafe(call()).catch_unwind());
            let (result, report) = beat.run(&msg, run, until).await;
            let handler_ok = match result {
                Ok(Ok(_)) => true,
                Ok(Err(_)) => false,
                Err(_panic) => {
                    tracing::warn!("idem-nats: the handler panicked: counted as a failure");
                    false
                }
            };
            let outcome = report.as_ref().map(|r| r.outcome);
            match self.policy.decide(outcome, handler_ok, attempt, held) {
                Decision::Ack => {
                    self.confirm(&msg, AckKind::Ack, "ack").await?;
                    self.failures.forget(&id);
                    return Ok(Settled::Acked { outcome, held });
                }
                Decision::Retry {
                    after,
                    reason: RetryReason::HandlerFailed { attempt },
                } => {
                    // Asked under the heartbeat (+WPI) and bounded, so that a slow JetStream API
                    // never lets `ack_wait` pass with the message in hand.
                    let until = Instant::now() + self.max_progress;
                    let max_deliver = beat.run(&msg, self.max_deliver(&msg), until).await;
                    if max_deliver.is_some_and(|max| delivered >= max) {
                        // JetStream will not deliver it again: a -NAK would drop it silently.
                        let reason = DeadLetterReason::HandlerFailed { attempts: attempt };
                        return self
                            .dead_letter(&msg, reason, report.as_ref(), &mut beat)
                            .await;
                    }
                    telemetry::redelivery(RetryReason::HandlerFailed { attempt }, after, &report);
                    msg.ack_with(AckKind::Nak(Some(after)))
                        .await
                        .map_err(Error::broker("nak"))?;
                    self.failures.record(id, attempt);
                    return Ok(Settled::Redelivering { after, attempt });
                }
                Decision::Retry { after, reason } => {
                    // In flight elsewhere, store unavailable, or unsettled: not a failure of
                    // this message. Held here (kept alive with +WPI), the claim tried again
                    // after `after`: no delivery is spent (see the crate docs, "In flight").
                    telemetry::redelivery(reason, after, &report);
                    held += 1;
                    beat.hold(&msg, after).await;
                }
                Decision::DeadLetter { reason } => {
                    return self
                        .dead_letter(&msg, reason, report.as_ref(), &mut beat)
                        .await;
                }
                other => {
                    // A decision newer than this glue: redeliver it, the safe default.
                    let after = self.policy.backoff;
                    tracing::warn!(decision = ?other, "idem-nats: unknown decision: redelivered");
                    msg.ack_with(AckKind::Nak(Some(after)))
                        .await
                        .map_err(Error::broker("nak"))?;
                    return Ok(Settled::Redelivering { after, attempt });
                }
            }
        }
    }

    /// Publish the dead letter (trying again, the message held, until the dead-letter stream
    /// takes it), then terminate the original.
    async fn dead_letter(
        &self,
        msg: &Message,
        reason: DeadLetterReason,
        report: Option<&Report>,
        beat: &mut Heartbeat,
    ) -> Result<Settled, Error> {
        let info = msg.info().map_err(|_| Error::NotJetStream)?;
        let scope = report.map(|r| r.scope.as_ref());
        let headers = dead_letter::dead_letter_headers(msg, &info, reason, scope);
        let mut failures = 0u32;
        let (stream, sequence) = loop {
            match dead_letter::publish(msg, &self.dead_letter_subject, headers.clone()).await {
                Ok(kept) => break kept,
                Err(e) => {
                    // Never +TERM what no stream kept: hold it and try again.
                    let pause = self
                        .policy
                        .backoff
                        .saturating_mul(1 << failures.min(16))
                        .min(self.policy.max_backoff);
                    failures += 1;
                    tracing::warn!(
                        subject = %self.dead_letter_subject,
                        error = %e,
                        retry_in = ?pause,
                        "idem-nats: the dead letter was not kept (does a stream capture the subject?): held, trying again"
                    );
                    beat.hold(msg, pause).await;
                }
            }
        };
        if stream == info.stream {
            tracing::error!(
                subject = %self.dead_letter_subject,
                stream = %stream,
                "idem-nats: the dead-letter subject is captured by the consumed stream itself: the dead letter will be consumed again"
            );
        }
        telemetry::dead_letter(reason, report, &self.dead_letter_subject, &stream, sequence);
        self.confirm(msg, AckKind::Term, "term").await?;
        self.failures.forget(&(
            info.stream.to_owned(),
            info.consumer.to_owned(),
            info.stream_sequence,
        ));
        Ok(Settled::DeadLettered { reason })
    }

    /// The consumer's `max_deliver` as the server has it now (it may have been lowered since
    /// [`Glue::new`]: the cached value would `-NAK` a last delivery, which JetStream then drops).
    /// Asked only after a handler failure, for at most [`MAX_INFO_WAIT`] (or half of
    /// `ack_wait`, if shorter); each answer is kept. When the server does not answer, the value
    /// it answered last (to this glue or a clone of it; the one cached at [`Glue::new`] before
    /// any) is used: on the delivery that is the last under it, the message is dead-lettered
    /// rather than `-NAK`ed (fail safe).
    async fn max_deliver(&self, msg: &Message) -> Option<u32> {
        let known = || Some(self.max_deliver.load(Ordering::Relaxed)).filter(|&n| n > 0);
        let Ok(info) = msg.info() else {
            return known();
        };
        let wait = MAX_INFO_WAIT.min(self.ack_wait / 2);
        let asked = tokio::time::timeout(
            wait,
            msg.context
                .get_consumer_from_stream::<jetstream::consumer::Config, _, _>(
                    info.consumer,
                    info.stream,
                ),
        )
        .await;
        match asked {
            Ok(Ok(consumer)) => {
                let n = u32::try_from(consumer.cached_info().config.max_deliver).unwrap_or(0);
                self.max_deliver.store(n, Ordering::Relaxed);
                Some(n).filter(|&n| n > 0)
            }
            Ok(Err(e)) => {
                tracing::debug!(
                    error = %e,
                    "idem-nats: the consumer's info did not come: using its max_deliver known last"
                );
                known()
            }
            Err(_elapsed) => {
                tracing::debug!(
                    wait = ?wait,
                    "idem-nats: the consumer's info did not come in time: using its max_deliver known last"
                );
                known()
            }
        }
    }

    /// `+ACK` or `+TERM`, confirmed by the server when [`double_ack`](Self::double_ack) is on.
    async fn confirm(&self, msg: &Message, kind: AckKind, verb: &'static str) -> Result<(), Error> {
        let Some(reply) = msg.reply.clone() else {
            return Err(Error::NotJetStream);
        };
        if self.double_ack {
            // A request on the client's shared reply subscription: the server answers an ack
            // that carries a reply subject once it has applied it.
            msg.context
                .client()
                .request(reply, kind.into())
                .await
                .map(drop)
                .map_err(|e| Error::broker(verb)(e.into()))
        } else {
            msg.ack_with(kind).await.map_err(Error::broker(verb))
        }
    }
}

/// How many times JetStream has delivered `msg` (1 the first time), from its ack subject, and
/// which message it is (stream, consumer, stream sequence).
pub(crate) fn delivery_count(msg: &Message) -> Option<(u32, (String, String, u64))> {
    let info = msg.info().ok()?;
    let delivered = u32::try_from(info.delivered).ok().filter(|&n| n > 0)?;
    Some((
        delivered,
        (
            info.stream.to_owned(),
            info.consumer.to_owned(),
            info.stream_sequence,
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_remembered_per_message_forgotten_once_settled_and_bounded() {
        let f = Failures::default();
        let id = |seq| ("S".to_owned(), "c".to_owned(), seq);
        assert_eq!(f.get(&id(1)), 0);
        f.record(id(1), 2);
        assert_eq!(f.get(&id(1)), 2);
        assert_eq!(f.get(&("S".to_owned(), "other".to_owned(), 1)), 0);
        f.forget(&id(1));
        assert_eq!(f.get(&id(1)), 0);
        for seq in 0..MAX_REMEMBERED as u64 {
            f.record(id(seq), 1);
        }
        f.record(id(u64::MAX), 1);
        let seen = f.seen.lock().unwrap();
        assert!(seen.len() <= MAX_REMEMBERED / 2 + 1, "{}", seen.len());
        assert_eq!(seen.get(&id(u64::MAX)), Some(&1));
        assert_eq!(seen.get(&id(0)), None);
    }
}
