//! # idem-nats: NATS JetStream glue for idem
//!
//! **The rule: a message is acknowledged only once its effect is done (committed, with the
//! transactional attribute), and no message is ever dropped without a decision, a log line,
//! and, for a dead letter, a copy kept in a stream.** The loop stays the loop you have; the
//! handler gets one attribute; `glue.settle(message, || ...)` replaces `message.ack()`.
//!
//! Before, a JetStream pull consumer that issues a coupon twice when an order arrives twice:
//!
//! ```no_run
//! # use futures_util::StreamExt as _;
//! # #[derive(serde::Deserialize)] struct OrderPaid { order_id: u64 }
//! # async fn issue_coupon(order_id: u64) -> Result<(), idem_runtime::Error> { Ok(()) }
//! # async fn f(consumer: async_nats::jetstream::consumer::PullConsumer) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut messages = consumer.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = message?;
//!     let order: OrderPaid = serde_json::from_slice(&message.payload)?;
//!     issue_coupon(order.order_id).await?;
//!     message.ack().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! After (the transactional form on PostgreSQL: the coupon and idem's done mark commit together):
//!
//! ```no_run
//! # use futures_util::StreamExt as _;
//! use idem_runtime::sqlx::{Postgres, Transaction};
//! use idem_runtime::{PgStore, idempotent};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { order_id: i64 }
//!
//! #[idempotent(key = "order.order_id", tx = "tx", store = "store", scope = "coupons.issue")]
//! async fn issue_coupon(store: &PgStore, tx: &mut Transaction<'_, Postgres>, order: &OrderPaid) -> Result<(), AppError> {
//!     // INSERT INTO coupons ... on &mut **tx
//!     Ok(())
//! }
//!
//! /// Parse, begin, call, commit: `Ok` only after the commit.
//! async fn on_order_paid(store: &PgStore, body: &[u8]) -> Result<(), AppError> {
//!     let order: OrderPaid = serde_json::from_slice(body)?; // the business key is in the body
//!     let mut tx = store.pool().begin().await?;
//!     issue_coupon(store, &mut tx, &order).await?;
//!     tx.commit().await?;
//!     Ok(())
//! }
//!
//! # async fn f(consumer: async_nats::jetstream::consumer::PullConsumer, store: PgStore) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let glue = idem_nats::Glue::new(&consumer);
//! let mut messages = consumer.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = message?;
//!     let body = message.payload.clone();
//!     glue.settle(message, || on_order_paid(&store, &body)).await?; // instead of message.ack()
//! }
//! # Ok(()) }
//! # #[derive(Debug, thiserror::Error)]
//! # enum AppError {
//! #     #[error(transparent)] Idem(#[from] idem_runtime::Error),
//! #     #[error(transparent)] Db(#[from] idem_runtime::sqlx::Error),
//! #     #[error(transparent)] Body(#[from] serde_json::Error),
//! # }
//! ```
//!
//! `cargo run -p idem-nats --example coupon-consumer` runs both loops on the same duplicated
//! stream and prints the coupons each issued. For throughput, settle several messages at once
//! (`messages.for_each_concurrent(prefetch, ...)`, as `benches/consumer_throughput.rs` does).
//!
//! ## What `settle` does
//!
//! It runs the caller's future inside [`idem_runtime::observe`], takes the
//! [`Decision`](idem_runtime::ack::Decision) of
//! [`Policy::decide`](idem_runtime::ack::Policy::decide) (the one table every broker glue
//! shares) and carries it out:
//!
//! | the call | decision | JetStream |
//! |---|---|---|
//! | `Executed` or `Replayed`, the future `Ok` (after the caller's commit); `Unreplayable`; no idempotent call and `Ok` | ack | `+ACK`, confirmed by the server (a double ack; [`Glue::double_ack`]) |
//! | the future `Err` (the handler's, a commit that failed, a body that does not parse) or a panic, failure `n` | retry | `-NAK {"delay": backoff x 2^(n-1)}` |
//! | failure `n` = `max_attempts`, or on the last delivery `max_deliver` allows (as the server has it now) | dead letter | published to the dead-letter subject, then `+TERM` |
//! | in flight elsewhere; the store did not answer; the mark unsettled (lease lost, transaction aborted) | retry | **held in-process** with `+WPI`, the claim tried again after the policy's pause |
//! | `Mismatch`, `Corrupt`, invalid key, not transactional, no store | dead letter | published to the dead-letter subject, then `+TERM` |
//!
//! ## In flight: held in-process, not `-NAK`ed
//!
//! A duplicate whose key another consumer holds must not be acked (the holder may still fail)
//! and must not be counted as a failure. JetStream offers two ways to wait: hold the message
//! (it is not redelivered while it is unacked and its `ack_wait` is renewed with `+WPI`), or
//! `-NAK` it with a delay. **Every `-NAK` counts as a delivery against the consumer's
//! `max_deliver`**, and a message past `max_deliver` is no longer delivered: nothing but an
//! advisory says so. Measured with `benches/in_flight.rs` (a 2 s holder, 4 duplicates and 40
//! other orders behind them, one sequential loop, the policy's pauses of 100 ms doubling):
//!
//! | strategy | max_deliver | duplicates acked | lost | deliveries of the 4 | last duplicate acked after the holder | other orders handled while the holder ran |
//! |---|---:|---:|---:|---:|---:|---:|
//! | hold (`+WPI`, claim retried) | 5 | 4 | 0 | 4 | 1.17 s | 0 of 40 |
//! | `-NAK` with the same delays | 5 | **0** | **4** | 20 | (never) | 40 of 40 |
//! | hold | unlimited | 4 | 0 | 4 | 1.20 s | 0 of 40 |
//! | `-NAK` | unlimited | 4 | 0 | 24 | 1.20 s | 40 of 40 |
//!
//! With `-NAK`, a 2 s holder burned 5-6 deliveries per duplicate, and with `max_deliver = 5` it
//! **lost all four** silently; the deliveries it spends would also have to be told apart from
//! handler failures, which JetStream's count (`num_delivered`) cannot do and which would need
//! state kept outside the message. Holding spends no delivery: the glue's own `-NAK`s are its
//! failures only (see "Failures and `max_deliver`" for how they are counted). The cost of holding: the held message occupies a place of the
//! consumer's concurrency (and of `max_ack_pending`) while it waits, so a strictly sequential
//! loop stalls behind it (0 of 40 other orders meanwhile, above); settle concurrently and only
//! one slot waits. The same latency either way (the policy's back-off). A combination (hold
//! for a while, then `-NAK`) would bring back both the lost messages and the counting problem,
//! so the glue holds every non-failure retry: in flight, store unavailable (back-pressure:
//! consuming stops while the store is down instead of spending deliveries), and unsettled.
//! The hold is bounded by the holder: its lease is renewed only while it runs (at most
//! `max_lease`) and lapses `ttl` after a crash, when the held duplicate's claim succeeds.
//!
//! ## Progress while the handler runs
//!
//! While the caller's future runs (and while a message is held), the glue sends `+WPI` every
//! third of the consumer's `ack_wait` ([`Glue::progress_every`]), so JetStream neither
//! redelivers a slow handler's message to another consumer nor runs it twice; idem renews the
//! key's lease meanwhile. The signals stop when the call ends, and after
//! [`Glue::max_progress`] (1 h, idem's default `max_lease`) for a wedged call, so that
//! JetStream redelivers it as idem gives up renewing its lease. A handler that ends before the
//! first signal is due costs one timer, no message.
//!
//! ## Failures and `max_deliver`
//!
//! The handler-failure count given to the policy is the number of failures the glue (or a clone
//! of it) saw and `-NAK`ed for that message (stream, consumer, stream sequence), plus this one;
//! never more than the message's `num_delivered`. `num_delivered` alone is not the count: it
//! also counts the deliveries a consumer that died or closed returned unstarted once `ack_wait`
//! passed (its pull batch, a duplicate it held), and a message whose handler never ran would
//! be dead-lettered as if it had failed `max_attempts` times (the RabbitMQ glue does not count
//! such returns either). The count is kept in the process (at most 65,536 messages, the oldest
//! half forgotten past it): a failure seen by another process, or before a restart, is not
//! counted here, so a message that fails on several processes can run up to `max_attempts`
//! times on each, and a message that kills every process it reaches is bounded only by
//! `max_deliver`. `max_deliver` is asked of the server (the consumer's info) after each
//! failure (under the heartbeat, `+WPI`, and for at most 5 s or half of `ack_wait`), so a limit
//! lowered under a running glue is seen; on the last delivery it allows, a failure is
//! dead-lettered instead of `-NAK`ed (JetStream would drop it). When the server does not answer,
//! the value it answered last is used (fail safe: the last delivery under it is dead-lettered).
//! Give the consumer
//! `max_deliver` = -1 (unlimited) or at least the policy's `max_attempts`, and let the policy
//! dead-letter; a finite `max_deliver` bounds a message that crashes its consumers.
//!
//! ## Dead letters
//!
//! JetStream has no dead-letter queue. The glue publishes the message, its body and headers,
//! to [`Glue::dead_letter_subject`] (default `idem.dead.<stream>`, captured by the stream
//! `<stream>_DEAD` that [`Glue::ensure_dead_letter_stream`] creates; the consumed stream must
//! not capture it), with the [`headers`] saying why, where from and after how many deliveries
//! (never the key), waits for that stream's acknowledgement, and only then sends `+TERM`. A
//! dead letter no stream takes is not terminated: the message is held and the publish retried
//! with back-off, logged at WARN each time. Its `Nats-Msg-Id` is
//! `idem-dead:<stream>:<consumer>:<seq>`, so a dead letter published twice by one consumer (a
//! lost `+TERM`) is kept once within the dead-letter stream's duplicate window, while two
//! consumers of one stream that give up on the same message each keep theirs. Each dead letter is logged at WARN with the scope, the redacted key and the
//! reason; each retry at DEBUG.
//!
//! ## Metrics
//!
//! With the `metrics` feature: `idem_redeliveries_total{broker="nats", reason}` (every retry
//! carried out: a `-NAK` after a failure, or an in-process hold; `reason` is
//! [`RetryReason::as_str`](idem_runtime::ack::RetryReason::as_str)) and
//! `idem_dead_letters_total{broker="nats", reason}`
//! ([`DeadLetterReason::as_str`](idem_runtime::ack::DeadLetterReason::as_str)).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dead_letter;
mod error;
mod glue;
mod progress;
mod telemetry;

pub use dead_letter::headers;
pub use error::Error;
pub use glue::{Glue, Settled};
pub use telemetry::BROKER;
