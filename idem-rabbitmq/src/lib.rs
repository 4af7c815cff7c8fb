//! # idem on RabbitMQ (lapin): the consumer acks only what is done
//!
//! **The rule**: a delivery is acked only once its effect is done, and a redelivery of it finds
//! the done mark (a replay). A duplicate that arrives while another consumer runs the same key
//! is neither acked (the holder may still fail) nor handed straight back to the queue (that
//! bounces it between consumers in a busy loop, and on a quorum queue every `basic.nack` with
//! requeue burns one of its `x-delivery-limit` deliveries): it comes back after the pause idem
//! gives, through a delay queue.
//!
//! The loop stays the one you have; [`Glue::settle`] replaces `delivery.ack()`:
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use lapin::{Connection, ConnectionProperties, options::*, types::FieldTable};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { id: u64, user: u64 }
//!
//! #[idem_runtime::idempotent(key = "order_id", ttl = "30s")]
//! async fn issue_coupon(order_id: u64, user: u64) -> Result<u64, AppError> {
//!     Ok(order_id * 1000 + user) // ... your code, unchanged
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AppError {
//!     #[error(transparent)] Idem(#[from] idem_runtime::Error),
//!     #[error(transparent)] Body(#[from] serde_json::Error),
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let conn = Connection::connect("amqp://127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let channel = conn.create_channel().await?;
//! let glue = idem_rabbitmq::Glue::builder("orders").build(&conn).await?;
//! channel.queue_declare("orders".into(), QueueDeclareOptions::durable(), glue.topology().queue_arguments()).await?;
//! channel.basic_qos(16, BasicQosOptions::default()).await?;
//! let mut consumer = channel
//!     .basic_consume("orders".into(), "coupons".into(), BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     glue.settle(&delivery, async {
//!         let order: OrderPaid = serde_json::from_slice(&delivery.data)?; // the business key is in the body
//!         issue_coupon(order.id, order.user).await
//!     })
//!     .await?; // instead of delivery.ack()
//! }
//! # Ok(()) }
//! ```
//!
//! For database effects use the transactional attribute and commit inside the future: `settle`
//! acks only after the future returned `Ok`, that is after the commit.
//!
//! ## What `settle` does with each outcome
//!
//! The decision is [`idem_runtime::ack::Policy::decide`]'s, the same table for every broker; this
//! crate only carries it out:
//!
//! | decision | RabbitMQ verbs |
//! |---|---|
//! | ack (executed or replayed, and the future returned `Ok`) | `basic.ack` |
//! | retry after `d` (in flight elsewhere, store outage, unsettled run, failed attempt `n` < `max_attempts`) | publish a copy to the delay queue `q.idem-delay.<d rounded up to 2^k ms>`, wait for the publisher confirm, then `basic.ack` the original; the delay queue's TTL dead-letters it back to `q` |
//! | dead letter (mismatch, corrupt record, invalid key, misconfigured store, out of attempts) | publish a copy with `x-idem-reason` to `q.dead-letter`, wait for the confirm, then `basic.ack` the original; one WARN line |
//!
//! The copy is confirmed before the original is acked, so a crash between the two leaves both
//! (a duplicate, which idem answers), never neither. Every copy is published persistent
//! (`delivery_mode` 2) whatever the original was: once the original is acked the copy is the only
//! one, and a transient message in a classic delay or dead-letter queue would not survive a broker
//! restart.
//!
//! **A delay or dead-letter queue that is gone** (deleted by an operator) returns the copy as
//! unroutable. The glue then declares that queue again and publishes the copy once more; only
//! that second copy's confirm lets it ack the original.
//!
//! **No copy placed, nothing held.** Should the broker still not take the copy (a publisher
//! nack: a delay queue full with `reject-publish`, a resource alarm; returned again; a refused
//! declaration; a closed channel), the original is never acked: it is held in the process for
//! the pause the decision asked for (the policy's first pause for a dead letter; at most 30 s),
//! so that it does not come straight back faster than its back-off, then handed back
//! (`basic.nack` with requeue, on the consumer's channel) and `settle` returns the error
//! ([`Error::NotConfirmed`], [`Error::Broker`]). The hold keeps the consumer's loop waiting, as
//! a delivery held in process does (see below); it happens only while the broker refuses copies.
//!
//! **The glue's channel** is opened again when a channel error closed it (a refused declaration,
//! a missing permission), once per settle that needs a copy, and the cache of declared delay
//! queues is dropped with it: as often as needed with
//! [`GlueBuilder::build_shared`], from 4 spare channels opened at [`GlueBuilder::build`] (which
//! only borrows the connection; then [`Error::ChannelClosed`]).
//!
//! **Limit: no `expires` policy on the delay queues.** RabbitMQ counts a queue as unused when it
//! has no consumer and no `basic.get`; publishing does not renew it, and a delay queue is never
//! consumed. An `expires` policy matching `*.idem-delay.*` deletes a delay queue with the copies
//! waiting in it, whose originals were acked: they are lost. The glue cannot override it (for
//! `expires`, RabbitMQ applies the lower of the policy and the queue's `x-expires`). Keep such
//! policies off the glue's queues.
//!
//! **Counting failures.** The handler's failures travel on the copies, in the glue's own header
//! `x-idem-failures`, on classic and quorum queues alike (a copy is a new message for the broker:
//! its `x-delivery-count` starts again at 0, and `x-death` counts trips through the delay queue,
//! not failures). In-flight deferrals raise `x-idem-deferrals` only, which spaces them out and
//! never dead-letters. `redelivered` is only a flag and is not counted. A quorum queue's
//! `x-delivery-count` on the delivery itself counts the times *this* copy came back because a
//! consumer died or closed its channel holding it; the glue logs it but does not count it as a
//! failure: a consumer killed with 16 deliveries prefetched returns all 16, most never started,
//! and counting them would dead-letter healthy messages during a rolling restart. The broker's own
//! `x-delivery-limit` still bounds a message that kills every consumer it reaches (give the queue
//! [`Topology::queue_arguments`], so that it lands in the dead-letter queue rather than being
//! dropped); a classic queue has no such bound.
//!
//! ## Why a delay queue, and not holding the delivery
//!
//! RabbitMQ has no delayed requeue. The two ways around it, measured on this repository's
//! machine (RabbitMQ 3.10, loopback, 2 cores; `cargo bench -p idem-rabbitmq --bench in_flight`):
//!
//! | strategy | 200 other orders done after | the consumer's time per deferral | redelivery later than asked (median / max) | broker operations per deferral |
//! |---|---:|---:|---:|---|
//! | hold the delivery, sleep, claim again | 3.13 s | the whole pause: the loop waits | 1.1 ms / 1.4 ms | none; one prefetch slot held |
//! | delay queue (this crate) | 0.05 s | 1.25 ms | 17.6 ms / 26.2 ms | one confirmed publish, one ack |
//!
//! (One sequential consumer, prefetch 16, 200 orders and 8 duplicates of a key another task
//! holds for 2 s; the default policy: 100 ms doubling.)
//!
//! Holding an unacked delivery in process and trying the claim again costs no broker round
//! trip, but the loop above would wait out every pause in line (a duplicate of a slow handler
//! stalls every message behind it), it needs the work as a closure it can run again, each held
//! delivery keeps one prefetch slot, and a delivery held past the broker's `consumer_timeout` (30
//! min by default) closes the channel, which returns every unacked delivery of it and, on a quorum
//! queue, burns one delivery of each. The delay queue costs one confirmed publish per deferral
//! (a rare path: only duplicates that race a running holder, and failures), frees the prefetch
//! slot at once, survives a consumer restart (the copy is in the broker, not in the process), and
//! does not touch the queue's delivery count.
//!
//! ## Topology
//!
//! See [`Topology`]: the glue declares its dead-letter queue (`q.dead-letter`) and its delay
//! queues (`q.idem-delay.<n>ms`, quorum queues with at-least-once dead-lettering by default); you
//! declare your queue `q`, with [`Topology::queue_arguments`] so that the broker's own dead
//! letters go to the same place.
#![forbid(unsafe_code)]

mod error;
pub mod headers;
mod settle;
mod topology;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy, RetryReason};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};

pub use error::Error;
pub use topology::{QueueKind, Topology};

/// The glue for one consumer queue: its [`Policy`], its [`Topology`], and a channel of its own in
/// publisher-confirm mode for the copies it publishes. Cheap to clone; share it between tasks.
#[derive(Clone)]
pub struct Glue {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The channel copies are published on; replaced when it is closed (a channel error closes
    /// it: a refused declaration, a permission error).
    channel: Mutex<Channel>,
    /// Where a new channel comes from when the current one is closed.
    reopen: Reopen,
    policy: Policy,
    topology: Topology,
    /// Delay queues declared on this channel already.
    declared: Mutex<HashSet<String>>,
}

/// How the glue gets a new channel once its channel is closed.
enum Reopen {
    /// From the connection, as often as needed ([`GlueBuilder::build_shared`]).
    Connection(Arc<Connection>),
    /// From channels opened beside the first one at [`GlueBuilder::build`], which only borrows
    /// the connection: [`SPARE_CHANNELS`] of them.
    Spares(Mutex<Vec<Channel>>),
}

/// How many spare channels [`GlueBuilder::build`] opens.
pub(crate) const SPARE_CHANNELS: usize = 4;

impl Glue {
    /// The glue's channel, opened again (and the cache of declared delay queues dropped) when it
    /// is closed. Called once per settle that needs a copy.
    pub(crate) async fn channel(&self) -> Result<Channel, Error> {
        let current = lock(&self.inner.channel).clone();
        if current.status().connected() {
            return Ok(current);
        }
        let fresh = match &self.inner.reopen {
            Reopen::Connection(connection) => open_channel(connection).await?,
            Reopen::Spares(spares) => loop {
                let Some(spare) = lock(spares).pop() else {
                    return Err(Error::ChannelClosed);
                };
                if spare.status().connected() {
                    break spare;
                }
            },
        };
        let mut slot = lock(&self.inner.channel);
        if slot.status().connected() {
            // Another task replaced it meanwhile: keep that one, put a spare back.
            if let Reopen::Spares(spares) = &self.inner.reopen {
                lock(spares).push(fresh);
            }
            return Ok(slot.clone());
        }
        tracing::warn!(
            broker = "rabbitmq",
            queue = self.inner.topology.queue(),
            "the glue's channel was closed: publishing its copies on a new one"
        );
        *slot = fresh.clone();
        lock(&self.inner.declared).clear();
        Ok(fresh)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A channel in publisher-confirm mode.
async fn open_channel(connection: &Connection) -> Result<Channel, Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(Error::broker("channel.open"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(Error::broker("confirm.select"))?;
    Ok(channel)
}

impl std::fmt::Debug for Glue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Glue")
            .field("policy", &self.inner.policy)
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

impl Glue {
    /// Start building the glue for the consumer queue `queue`.
    ///
    /// ```no_run
    /// # async fn f(conn: lapin::Connection) -> Result<(), idem_rabbitmq::Error> {
    /// use std::time::Duration;
    /// let glue = idem_rabbitmq::Glue::builder("orders")
    ///     .policy(idem_runtime::ack::Policy::default().max_attempts(3))
    ///     .build(&conn)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(queue: &str) -> GlueBuilder {
        GlueBuilder {
            topology: Topology::new(queue),
            policy: Policy::default(),
        }
    }

    /// The queues this glue uses.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The decision policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }
}

/// Builds a [`Glue`].
#[derive(Debug, Clone)]
#[must_use]
pub struct GlueBuilder {
    topology: Topology,
    policy: Policy,
}

impl GlueBuilder {
    /// The decision policy (default: [`Policy::default`], 5 attempts, 1 s back-off doubling to
    /// 60 s, in-flight duplicates tried again after 100 ms doubling to 30 s).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Another dead-letter queue than `{queue}.dead-letter`.
    pub fn dead_letter_queue(mut self, name: &str) -> Self {
        self.topology = self.topology.with_dead_letter_queue(name);
        self
    }

    /// The kind of queue for the delay and dead-letter queues (default [`QueueKind::Quorum`]).
    pub fn queue_kind(mut self, kind: QueueKind) -> Self {
        self.topology = self.topology.with_kind(kind);
        self
    }

    /// Open the glue's channel on `connection` (publisher confirms on), and declare the
    /// dead-letter queue. The consumer's own queue is yours to declare.
    ///
    /// The connection is only borrowed, so the glue opens its spare channels now: a channel
    /// error (a refused declaration, a missing permission) closes the glue's channel, and the
    /// next settle that needs a copy goes on with a spare, up to 4 times. Give the glue the
    /// connection itself with [`build_shared`](Self::build_shared) to have it open a new channel
    /// as often as needed.
    pub async fn build(self, connection: &Connection) -> Result<Glue, Error> {
        self.topology.validate()?;
        let mut spares = Vec::with_capacity(SPARE_CHANNELS);
        for _ in 0..SPARE_CHANNELS {
            spares.push(open_channel(connection).await?);
        }
        self.finish(connection, Reopen::Spares(Mutex::new(spares)))
            .await
    }

    /// As [`build`](Self::build), keeping `connection`: whenever the glue's channel is closed
    /// (a channel error), the next settle that needs a copy opens a new one on it.
    pub async fn build_shared(self, connection: Arc<Connection>) -> Result<Glue, Error> {
        let reopen = Reopen::Connection(Arc::clone(&connection));
        self.finish(&connection, reopen).await
    }

    async fn finish(self, connection: &Connection, reopen: Reopen) -> Result<Glue, Error> {
        self.topology.validate()?;
        let channel = open_channel(connection).await?;
        self.topology.declare_dead_letter(&channel).await?;
        Ok(Glue {
            inner: Arc::new(Inner {
                channel: Mutex::new(channel),
                reopen,
                policy: self.policy,
                topology: self.topology,
                declared: Mutex::new(HashSet::new()),
            }),
        })
    }
}

/// What [`Glue::settle`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// Acked: the effect is done (`outcome` says whether it ran now or was replayed; `None` when
    /// the future made no idempotent call).
    Acked {
        /// How the idempotent call ended.
        outcome: Option<CallOutcome>,
    },
    /// A copy waits in the delay queue and comes back after `after` (rounded up to the delay
    /// queue's TTL); the original was acked.
    Redelivered {
        /// The pause.
        after: Duration,
        /// Why.
        reason: RetryReason,
    },
    /// A copy is in the dead-letter queue; the original was acked.
    DeadLettered {
        /// Why.
        reason: DeadLetterReason,
    },
}
