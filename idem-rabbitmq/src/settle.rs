//! Carrying out one decision with RabbitMQ's verbs.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::task::Poll;
use std::time::Duration;

use idem_runtime::ack::{DeadLetterReason, Decision, RetryReason};
use idem_runtime::{Report, observe};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use lapin::{Channel, Confirmation};

use crate::headers::{self, Counts};
use crate::{Error, Glue, Settled, lock};

/// The longest a delivery is held in-process when no copy of it can be placed, before it is
/// requeued.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(30);

impl Glue {
    /// Run `work` (the consumer's handling of `delivery`: decode the body, call the idempotent
    /// handler, commit its transaction) and settle the delivery from how it ended, instead of
    /// `delivery.ack()`:
    ///
    /// - **ack** when the idempotent call ran or replayed and `work` returned `Ok` (in the
    ///   transactional form, `work` returns `Ok` only after its commit, so nothing is acked that
    ///   did not commit);
    /// - **redeliver later** (in flight elsewhere, store outage, unsettled run, a failed attempt
    ///   below [`Policy::max_attempts`](idem_runtime::ack::Policy::max_attempts)): a copy goes to
    ///   the delay queue for the policy's pause, confirmed by the broker, then the original is
    ///   acked; the copy carries the failure count (`x-idem-failures`), and an in-flight deferral
    ///   only raises `x-idem-deferrals`, never the failure count nor the queue's delivery count;
    /// - **dead-letter** (another payload under a done key, a handler out of attempts, ...): a
    ///   copy with `x-idem-reason` goes to the dead-letter queue, confirmed, then the original is
    ///   acked; logged at WARN with the scope, the redacted key and the reason.
    ///
    /// `work`'s `Err` counts as a failure of the handler, also when it happened before the
    /// handler ran (a body that does not decode): such a message ends in the dead-letter queue
    /// after `max_attempts`, never dropped. Its error is not printed (it may quote the key).
    ///
    /// A panic in `work` counts as a failure too: the delivery is settled as one, then the panic
    /// goes on to the caller.
    ///
    /// When the copy a decision needs cannot be placed, `settle` never acks: it holds the
    /// delivery for the decision's pause (at most 30 s), hands it back (`basic.nack` with
    /// requeue) and returns the error; see the [crate docs](crate) ("No copy placed, nothing
    /// held").
    ///
    /// ```no_run
    /// # async fn example(glue: idem_rabbitmq::Glue, delivery: lapin::message::Delivery) -> Result<(), idem_rabbitmq::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct OrderPaid { id: u64 }
    ///
    /// #[idem_runtime::idempotent(key = "order_id")]
    /// async fn issue_coupon(order_id: u64) -> Result<u64, AppError> { Ok(order_id) }
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error(transparent)] Idem(#[from] idem_runtime::Error),
    ///     #[error(transparent)] Body(#[from] serde_json::Error),
    /// }
    ///
    /// let settled = glue
    ///     .settle(&delivery, async {
    ///         let order: OrderPaid = serde_json::from_slice(&delivery.data)?;
    ///         issue_coupon(order.id).await
    ///     })
    ///     .await?;
    /// tracing::info!(?settled, "delivery settled");
    /// # Ok(()) }
    /// ```
    pub async fn settle<F, T, E>(&self, delivery: &Delivery, work: F) -> Result<Settled, Error>
    where
        F: Future<Output = Result<T, E>>,
    {
        let counts = Counts::read(&delivery.properties);
        let mut work = std::pin::pin!(work);
        // Catch a panic inside `observe`, so that the report of the call that panicked is kept.
        let caught = std::future::poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
                Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(panic) => Poll::Ready(Err(panic)),
            }
        });
        let (out, report) = observe(caught).await;
        let handler_ok = matches!(out, Ok(Ok(_)));
        let outcome = report.as_ref().map(|r| r.outcome);
        let attempt = counts.failures.saturating_add(1);
        let decision = self
            .inner
            .policy
            .decide(outcome, handler_ok, attempt, counts.deferrals);
        let settled = self
            .carry_out(delivery, decision, counts, report.as_ref())
            .await;
        if let Err(panic) = out {
            resume_unwind(panic);
        }
        settled
    }

    async fn carry_out(
        &self,
        delivery: &Delivery,
        decision: Decision,
        counts: Counts,
        report: Option<&Report>,
    ) -> Result<Settled, Error> {
        let outcome = report.map(|r| r.outcome);
        let (scope, key) = match report {
            Some(r) => (
                r.scope.as_ref(),
                r.key
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |k| k.to_string()),
            ),
            None => ("-", "-".to_owned()),
        };
        match decision {
            Decision::Ack => {
                ack(delivery).await?;
                Ok(Settled::Acked { outcome })
            }
            Decision::DeadLetter { reason } => {
                let mut extra = vec![
                    (headers::REASON, headers::text(reason.as_str())),
                    (headers::REASON_TEXT, headers::text(&reason.to_string())),
                    (headers::QUEUE, headers::text(self.inner.topology.queue())),
                    (
                        headers::FAILURES,
                        headers::count(failures_now(reason, counts)),
                    ),
                ];
                if let Some(r) = report {
                    extra.push((headers::SCOPE, headers::text(&r.scope)));
                    if r.key.is_some() {
                        extra.push((headers::KEY, headers::text(&key)));
                    }
                }
                let dlq = self.inner.topology.dead_letter_queue().to_owned();
                // No copy placed: held for the policy's first pause, then requeued.
                let pause = self.inner.policy.backoff;
                self.copy_or_requeue(delivery, pause, async {
                    let channel = self.channel().await?;
                    self.publish_copy(&channel, delivery, &dlq, Target::DeadLetter, &extra)
                        .await
                })
                .await?;
                ack(delivery).await?;
                tracing::warn!(
                    broker = "rabbitmq",
                    queue = self.inner.topology.queue(),
                    scope,
                    key = %key,
                    reason = %reason,
                    outcome = outcome.map_or("-", |o| o.as_str()),
                    dead_letter_queue = %dlq,
                    "dead-lettered a delivery"
                );
                #[cfg(feature = "metrics")]
                metrics::counter!(
                    "idem_dead_letters_total",
                    "broker" => "rabbitmq",
                    "reason" => reason.as_str()
                )
                .increment(1);
                Ok(Settled::DeadLettered { reason })
            }
            Decision::Retry { after, reason } => {
                self.redeliver(delivery, after, reason, counts).await?;
                tracing::debug!(
                    broker = "rabbitmq",
                    queue = self.inner.topology.queue(),
                    scope,
                    key = %key,
                    reason = reason.as_str(),
                    after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                    failures = counts.failures,
                    deferrals = counts.deferrals,
                    returns = counts.returns,
                    "redelivering later"
                );
                Ok(Settled::Redelivered { after, reason })
            }
            // A decision this version does not know: keep the message, retry it after the
            // policy's first pause, as the safe choice.
            _ => {
                let (after, reason) = (self.inner.policy.backoff, RetryReason::Unsettled);
                self.redeliver(delivery, after, reason, counts).await?;
                Ok(Settled::Redelivered { after, reason })
            }
        }
    }

    /// A copy to the delay queue for `after`, then the original's ack.
    async fn redeliver(
        &self,
        delivery: &Delivery,
        after: Duration,
        reason: RetryReason,
        counts: Counts,
    ) -> Result<(), Error> {
        let (failures, deferrals) = match reason {
            RetryReason::HandlerFailed { attempt } => (attempt, counts.deferrals),
            // In flight elsewhere, store outage, unsettled: not a failure of this message.
            _ => (counts.failures, counts.deferrals.saturating_add(1)),
        };
        let (queue, ttl) = self.inner.topology.delay_queue(after);
        let extra = [
            (headers::FAILURES, headers::count(failures)),
            (headers::DEFERRALS, headers::count(deferrals)),
        ];
        self.copy_or_requeue(delivery, after, async {
            let channel = self.channel().await?;
            self.ensure_delay_queue(&channel, &queue, ttl).await?;
            self.publish_copy(&channel, delivery, &queue, Target::Delay(ttl), &extra)
                .await
        })
        .await?;
        ack(delivery).await?;
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "idem_redeliveries_total",
            "broker" => "rabbitmq",
            "reason" => reason.as_str()
        )
        .increment(1);
        Ok(())
    }

    /// Place the copy `copy` makes; when it cannot be placed (a refused or unconfirmed publish,
    /// a failed declaration, a closed channel), never ack the original: hold it in-process for
    /// `pause` (at most [`MAX_HOLD`]) so that it does not come straight back without its
    /// back-off, then hand it back to the queue (`basic.nack` with requeue, through the
    /// delivery's own channel) and return the error.
    async fn copy_or_requeue(
        &self,
        delivery: &Delivery,
        pause: Duration,
        copy: impl Future<Output = Result<(), Error>>,
    ) -> Result<(), Error> {
        let Err(error) = copy.await else {
            return Ok(());
        };
        let hold = pause.min(MAX_HOLD);
        tracing::warn!(
            broker = "rabbitmq",
            queue = self.inner.topology.queue(),
            error = %error,
            hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            "no copy could be placed: the original is held, then requeued"
        );
        tokio::time::sleep(hold).await;
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        if let Err(e) = delivery.acker.nack(requeue).await {
            tracing::warn!(
                broker = "rabbitmq",
                queue = self.inner.topology.queue(),
                error = %e,
                "the original could not be requeued (its channel is closed: the broker requeues it)"
            );
        }
        Err(error)
    }

    async fn ensure_delay_queue(
        &self,
        channel: &Channel,
        queue: &str,
        ttl: Duration,
    ) -> Result<(), Error> {
        if lock(&self.inner.declared).contains(queue) {
            return Ok(());
        }
        // Two tasks may both declare it: a second declaration with the same arguments is a no-op.
        self.inner
            .topology
            .declare_delay(channel, queue, ttl)
            .await?;
        lock(&self.inner.declared).insert(queue.to_owned());
        Ok(())
    }

    /// Publish a copy of `delivery` to `queue` through the default exchange and wait for the
    /// broker's confirm. A copy returned as unroutable means its queue is gone (deleted by an
    /// operator, or by an `expires` policy on idle queues): the glue declares the queue again and
    /// publishes once more. Still unconfirmed (a nack, or returned again): an error, and
    /// [`copy_or_requeue`](Self::copy_or_requeue) requeues the original, never acked.
    async fn publish_copy(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        queue: &str,
        target: Target,
        extra: &[(&str, AMQPValue)],
    ) -> Result<(), Error> {
        let properties = headers::copy_properties(
            &delivery.properties,
            matches!(target, Target::DeadLetter),
            extra,
        );
        let mut why = self
            .try_publish(channel, delivery, queue, &properties)
            .await?;
        if why == Some("returned") {
            tracing::warn!(
                broker = "rabbitmq",
                queue = self.inner.topology.queue(),
                copy_for = queue,
                "the copy was returned as unroutable: declaring its queue again"
            );
            self.declare_again(channel, queue, target).await?;
            why = self
                .try_publish(channel, delivery, queue, &properties)
                .await?;
        }
        let Some(why) = why else { return Ok(()) };
        tracing::warn!(
            broker = "rabbitmq",
            queue = self.inner.topology.queue(),
            copy_for = queue,
            why,
            "the broker did not take a copy"
        );
        Err(Error::NotConfirmed {
            queue: queue.to_owned(),
            why,
        })
    }

    /// One confirmed publish: `None` once the broker has the copy, else why not.
    async fn try_publish(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        queue: &str,
        properties: &lapin::BasicProperties,
    ) -> Result<Option<&'static str>, Error> {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties.clone(),
            )
            .await
            .map_err(Error::broker("basic.publish"))?
            .await
            .map_err(Error::broker("publisher confirm"))?;
        Ok(match confirm {
            Confirmation::Ack(None) => None,
            Confirmation::Ack(Some(_)) => Some("returned"),
            Confirmation::Nack(_) => Some("nack"),
            // The glue's channel is in confirm mode; if it were not, nothing proves the copy
            // arrived.
            Confirmation::NotRequested => Some("not confirmed"),
        })
    }

    /// Declare the queue of a copy that came back unroutable: it was deleted after the glue
    /// declared it.
    async fn declare_again(
        &self,
        channel: &Channel,
        queue: &str,
        target: Target,
    ) -> Result<(), Error> {
        match target {
            Target::DeadLetter => self.inner.topology.declare_dead_letter(channel).await,
            Target::Delay(ttl) => {
                lock(&self.inner.declared).remove(queue);
                self.ensure_delay_queue(channel, queue, ttl).await
            }
        }
    }
}

/// Where a copy goes: a delay queue of that TTL, or the dead-letter queue (which keeps the
/// broker's `x-death` history).
#[derive(Debug, Clone, Copy)]
enum Target {
    Delay(Duration),
    DeadLetter,
}

/// The failures to record on a dead letter.
fn failures_now(reason: DeadLetterReason, counts: Counts) -> u32 {
    match reason {
        DeadLetterReason::HandlerFailed { attempts } => attempts,
        _ => counts.failures,
    }
}

async fn ack(delivery: &Delivery) -> Result<(), Error> {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::NotAcked),
        Err(source) => Err(Error::Broker {
            op: "basic.ack",
            source,
        }),
    }
}
