//! # idem on Kafka (rdkafka): an offset is committed only once its record is done
//!
//! **The rule**: the offset of a record is committed only when its outcome is final: its
//! idempotent call ran and was marked done, replayed a done key, or the record was copied to the
//! dead-letter topic. Commits go in partition order (offset *n* + 1 only after every record
//! before it in that partition is final), so a record whose key is in flight elsewhere holds back
//! its own partition's commit and never another partition's. Auto-commit and the automatic
//! offset store are off; the key is the business key your handler takes from the record (its
//! body or its Kafka key), never the offset.
//!
//! Your handler keeps its signature; the glue owns the consumer loop:
//!
//! ```no_run
//! use std::sync::Arc;
//! use rdkafka::{ClientConfig, Message, message::OwnedMessage};
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
//! # async fn run() -> Result<(), idem_kafka::Error> {
//! let mut config = ClientConfig::new();
//! config
//!     .set("bootstrap.servers", "127.0.0.1:9092")
//!     .set("group.id", "coupons")
//!     .set("auto.offset.reset", "earliest");
//! let glue = idem_kafka::Glue::builder(config).build()?;
//! glue.subscribe(&["orders"])?;
//! glue.run(|record: Arc<OwnedMessage>| async move {
//!     // The business key is in the body.
//!     let order: OrderPaid = serde_json::from_slice(record.payload().unwrap_or_default())?;
//!     issue_coupon(order.id, order.user).await
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! For database effects use the transactional attribute and commit inside the handler: the glue
//! counts the record as done only after the handler returned `Ok`, that is after the commit.
//!
//! ## What the loop does with each outcome
//!
//! The decision is [`idem_runtime::ack::Policy::decide`]'s, the same table for every broker;
//! this crate only carries it out:
//!
//! | decision | Kafka |
//! |---|---|
//! | ack (executed or replayed, and the handler returned `Ok`) | the record is final; its partition's offset is committed up to it |
//! | retry after `d`, in flight elsewhere (backed off, bounded by the policy's `in_flight_min`..`in_flight_max`) | the partition's worker waits `d` and runs the handler again; that partition's later records and commits wait; other partitions go on |
//! | retry after `d`, store outage or unsettled run | the same, backed off per retry |
//! | retry after `d`, the handler failed (attempt *n* < `max_attempts`) | the same; the attempt count is kept in the process (a restart starts it again) |
//! | dead letter (mismatch, corrupt record, invalid key, misconfigured store, out of attempts) | a copy goes to `<topic>.dlq` (body, key and headers, plus `idem-reason`, `idem-topic`, `idem-partition`, `idem-offset`); once the broker acknowledged the copy the record is final; one WARN line |
//!
//! A dead letter the broker does not take (the topic is missing, the broker is down) is not
//! final: the copy is tried again after the policy's first pause, as long as it takes, and the
//! partition waits; nothing is committed without its copy.
//!
//! ## Why retry in place, per partition
//!
//! Each assigned partition has a worker task that handles its records one after the other, in
//! offset order (Kafka's ordering per partition is kept, and committing "everything before *n*"
//! is then simply committing after each record). An in-flight duplicate is retried **in place**:
//! its worker sleeps the decision's pause and tries the claim again. Kafka has no per-record
//! redelivery to defer to (a seek back would drop everything fetched after it), and a retry topic
//! would reorder the partition. The price: the records behind it in the same partition wait, at
//! most the policy's `in_flight_max` per retry (the holder's lease bounds it too); other
//! partitions have their own workers and are not held. A worker with more than
//! [`GlueBuilder::max_buffered`] records waiting pauses its partition's fetching
//! (`rd_kafka_pause_partitions`) and resumes it once it has worked off half of them, so a
//! held partition does not fill the memory.
//!
//! ## Commits
//!
//! Each final record's offset (+ 1) is committed at once, asynchronously. Once a second the loop
//! also commits synchronously (on tokio's blocking pool) the final offsets the broker has not
//! confirmed yet, and sends them again until it answers `Ok`: a commit lost while the broker was
//! away is not left behind ([`Stats::commits_confirmed`], [`Stats::commit_failures`],
//! [`Glue::confirmed_offset`]). rdkafka's commit callback is not relied upon.
//!
//! One loop per glue ([`Error::LoopUsed`]): build a new glue to consume again.
//!
//! A panic of the handler (in its future, or in the closure before it returns one) is a failure
//! of the handler. A worker that dies otherwise (a panicking [`GlueBuilder::on_settled`]) stops
//! the loop with [`Error::WorkerFailed`]: a fresh worker would start past the records it had
//! queued, and its commits would cover them.
//!
//! ## Rebalances, shutdown, cancellation
//!
//! When a partition is revoked (or lost), its worker stops: a handler that is running is let
//! finish (its lease and fence keep a second effect out if the new owner starts the same record
//! meanwhile: the new owner sees it in flight and waits), but the worker commits nothing after
//! the revocation; a record waiting for a retry is abandoned; the records queued behind are
//! dropped. The new owner starts from the last committed offset, and idem replays what was done.
//!
//! [`Glue::run_until`] stops cleanly: no new record is started, each worker finishes the record
//! it has, and the final offsets are committed synchronously before it returns. Dropping the
//! future of [`Glue::run`] instead aborts the handlers where they are, as a crash would: nothing
//! unfinished is committed, the transactional form rolls back, and the redelivery finds the key
//! in flight until its lease ends, then runs or replays it.
#![forbid(unsafe_code)]

mod error;
mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy};
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::TopicPartitionList;

pub use error::Error;

/// The consumer glue: a [`StreamConsumer`] with auto-commit off, a [`FutureProducer`] for dead
/// letters, the decision [`Policy`], and the loop ([`run`](Glue::run)) that commits what is
/// final. Cheap to clone.
#[derive(Clone)]
pub struct Glue {
    inner: Arc<Inner>,
}

type OnSettled = Arc<dyn Fn(&Settled) + Send + Sync>;

pub(crate) struct Inner {
    consumer: StreamConsumer<GlueContext>,
    producer: FutureProducer,
    policy: Policy,
    dead_letter_suffix: String,
    max_buffered: usize,
    shared: Arc<Shared>,
    on_settled: Option<OnSettled>,
    /// A loop ran (or runs) on this glue: it runs one, once.
    pub(crate) used: std::sync::atomic::AtomicBool,
}

/// What the rebalance callbacks and the workers share.
#[derive(Default)]
pub(crate) struct Shared {
    /// The assignment epoch of each partition this consumer owns now; a worker works for one
    /// epoch and stops committing once its partition's epoch changed (revoked, or revoked and
    /// assigned again).
    epochs: Mutex<HashMap<(String, i32), u64>>,
    next_epoch: AtomicU64,
    /// The offsets the broker confirmed as committed (the next offset to consume), by the
    /// loop's synchronous confirmation commits.
    pub(crate) confirmed: Mutex<HashMap<(String, i32), i64>>,
    stats: Counters,
}

impl Shared {
    fn assign(&self, topic: &str, partition: i32) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.epochs).insert((topic.to_owned(), partition), epoch);
        epoch
    }

    fn revoke(&self, topic: &str, partition: i32) {
        lock(&self.epochs).remove(&(topic.to_owned(), partition));
    }

    /// The current epoch of a partition a record arrived on; a partition assigned without a
    /// rebalance callback (a manual `assign`) gets one on its first record.
    pub(crate) fn epoch_for(&self, topic: &str, partition: i32) -> u64 {
        if let Some(e) = lock(&self.epochs).get(&(topic.to_owned(), partition)) {
            return *e;
        }
        self.assign(topic, partition)
    }

    pub(crate) fn is_current(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        lock(&self.epochs).get(&(topic.to_owned(), partition)) == Some(&epoch)
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) records: AtomicU64,
    pub(crate) runs: AtomicU64,
    pub(crate) done: AtomicU64,
    pub(crate) commits_requested: AtomicU64,
    pub(crate) commits_confirmed: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) dead_letter_failures: AtomicU64,
    pub(crate) in_flight_retries: AtomicU64,
    pub(crate) failure_retries: AtomicU64,
    pub(crate) unsettled_retries: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) consume_errors: AtomicU64,
    pub(crate) pauses: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the glue has done so far (counters since it was built).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Records received from the broker (a redelivery counts again).
    pub records: u64,
    /// Handler runs (a retry in place counts again).
    pub runs: u64,
    /// Records final as done (executed or replayed).
    pub done: u64,
    /// Offset commits sent, one per final record (asynchronously, at once).
    pub commits_requested: u64,
    /// Confirmation commits the broker answered `Ok`: once a second, the loop commits
    /// synchronously the final offsets the broker has not confirmed yet.
    pub commits_confirmed: u64,
    /// Commits that failed (the broker refused them, or was away); the next second's
    /// confirmation commit sends the final offsets again, until one succeeds.
    pub commit_failures: u64,
    /// Records copied to their dead-letter topic (and so final).
    pub dead_letters: u64,
    /// Dead-letter copies the broker did not take (tried again).
    pub dead_letter_failures: u64,
    /// Retries in place because the key was in flight elsewhere.
    pub in_flight_retries: u64,
    /// Retries in place because the handler failed.
    pub failure_retries: u64,
    /// Retries in place because the store did not answer or the run was unsettled.
    pub unsettled_retries: u64,
    /// Records left uncommitted because their partition was revoked or the loop stopped.
    pub abandoned: u64,
    /// Errors the consumer reported (a broker that went away, ...); the loop goes on.
    pub consume_errors: u64,
    /// Times a partition's fetching was paused because its worker had more than
    /// [`GlueBuilder::max_buffered`] records waiting.
    pub pauses: u64,
}

/// One record's outcome, as [`GlueBuilder::on_settled`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// The record's topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// How many times the handler ran on it in this process.
    pub runs: u32,
    /// How it ended.
    pub end: End,
}

/// How a record ended in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum End {
    /// Done (ran or replayed): its offset is committed (`outcome` is `None` when the handler
    /// made no idempotent call).
    Committed {
        /// How the idempotent call ended.
        outcome: Option<CallOutcome>,
    },
    /// Copied to the dead-letter topic, then committed.
    DeadLettered {
        /// Why.
        reason: DeadLetterReason,
        /// Where the copy went.
        topic: String,
    },
    /// Not final: its partition was revoked, or the loop stopped, before it was. Nothing was
    /// committed for it; whoever owns the partition next gets it again.
    Abandoned,
}

/// The consumer context the glue installs: it tells the partition workers about revoked and
/// assigned partitions.
pub struct GlueContext {
    shared: Arc<Shared>,
}

impl ClientContext for GlueContext {}

impl ConsumerContext for GlueContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            for e in tpl.elements() {
                tracing::debug!(
                    broker = "kafka",
                    topic = e.topic(),
                    partition = e.partition(),
                    "partition revoked: its worker commits nothing more"
                );
                self.shared.revoke(e.topic(), e.partition());
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            for e in tpl.elements() {
                self.shared.assign(e.topic(), e.partition());
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Not relied upon (the loop confirms its commits synchronously); logged when it comes.
        if let Err(error) = result {
            tracing::debug!(broker = "kafka", %error, "an asynchronous offset commit failed");
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for Glue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Glue")
            .field("policy", &self.inner.policy)
            .field("dead_letter_suffix", &self.inner.dead_letter_suffix)
            .finish_non_exhaustive()
    }
}

impl Glue {
    /// Start building the glue from the consumer's configuration (`bootstrap.servers` and
    /// `group.id` at least). The glue sets `enable.auto.commit` and `enable.auto.offset.store`
    /// to `false` itself.
    ///
    /// ```no_run
    /// # fn f() -> Result<(), idem_kafka::Error> {
    /// let mut config = rdkafka::ClientConfig::new();
    /// config
    ///     .set("bootstrap.servers", "127.0.0.1:9092")
    ///     .set("group.id", "coupons")
    ///     .set("session.timeout.ms", "6000");
    /// let glue = idem_kafka::Glue::builder(config)
    ///     .policy(idem_runtime::ack::Policy::default().max_attempts(3))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder(config: ClientConfig) -> GlueBuilder {
        GlueBuilder {
            config,
            producer_config: None,
            policy: Policy::default(),
            dead_letter_suffix: ".dlq".to_owned(),
            max_buffered: 1000,
            on_settled: None,
        }
    }

    /// Subscribe the consumer to `topics` (a consumer group's assignment).
    pub fn subscribe(&self, topics: &[&str]) -> Result<(), Error> {
        self.inner
            .consumer
            .subscribe(topics)
            .map_err(Error::kafka("subscribe"))
    }

    /// The consumer, for what the glue does not wrap (assignment, positions, lag, committed
    /// offsets). Do not commit or store offsets through it: the glue owns them.
    pub fn consumer(&self) -> &StreamConsumer<GlueContext> {
        &self.inner.consumer
    }

    /// The dead-letter topic of records from `topic`: `<topic>.dlq` unless
    /// [`GlueBuilder::dead_letter_suffix`] said otherwise. The glue does not create it.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.inner.dead_letter_suffix)
    }

    /// The decision policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The offset the broker confirmed as committed for a partition (the next offset to
    /// consume), by the loop's last successful confirmation commit (once a second, and at the
    /// end of [`run_until`](Glue::run_until)); only for partitions it still owned then.
    pub fn confirmed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.inner.shared.confirmed)
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            records: g(&c.records),
            runs: g(&c.runs),
            done: g(&c.done),
            commits_requested: g(&c.commits_requested),
            commits_confirmed: g(&c.commits_confirmed),
            commit_failures: g(&c.commit_failures),
            dead_letters: g(&c.dead_letters),
            dead_letter_failures: g(&c.dead_letter_failures),
            in_flight_retries: g(&c.in_flight_retries),
            failure_retries: g(&c.failure_retries),
            unsettled_retries: g(&c.unsettled_retries),
            abandoned: g(&c.abandoned),
            consume_errors: g(&c.consume_errors),
            pauses: g(&c.pauses),
        }
    }
}

/// Builds a [`Glue`].
#[must_use]
pub struct GlueBuilder {
    config: ClientConfig,
    producer_config: Option<ClientConfig>,
    policy: Policy,
    dead_letter_suffix: String,
    max_buffered: usize,
    on_settled: Option<OnSettled>,
}

impl std::fmt::Debug for GlueBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlueBuilder")
            .field("policy", &self.policy)
            .field("dead_letter_suffix", &self.dead_letter_suffix)
            .field("max_buffered", &self.max_buffered)
            .finish_non_exhaustive()
    }
}

impl GlueBuilder {
    /// The decision policy (default: [`Policy::default`], 5 attempts, 1 s back-off doubling to
    /// 60 s, in-flight duplicates tried again after 100 ms doubling to 30 s).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The dead-letter topic's suffix (default `.dlq`: records from `orders` go to
    /// `orders.dlq`).
    pub fn dead_letter_suffix(mut self, suffix: &str) -> Self {
        self.dead_letter_suffix = suffix.to_owned();
        self
    }

    /// The dead-letter producer's configuration (default: the consumer's `bootstrap.servers`,
    /// `acks=all`, the idempotent producer, a 30 s `message.timeout.ms`).
    pub fn producer_config(mut self, config: ClientConfig) -> Self {
        self.producer_config = Some(config);
        self
    }

    /// How many records a partition's worker may have waiting before the glue pauses that
    /// partition's fetching (default 1000, at least 1).
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }

    /// Called with each record's outcome (from the partition's worker task; keep it short).
    pub fn on_settled(mut self, f: impl Fn(&Settled) + Send + Sync + 'static) -> Self {
        self.on_settled = Some(Arc::new(f));
        self
    }

    /// Create the consumer (auto-commit and the automatic offset store off) and the dead-letter
    /// producer.
    pub fn build(self) -> Result<Glue, Error> {
        let mut config = self.config;
        for owned in ["enable.auto.commit", "enable.auto.offset.store"] {
            if config
                .get(owned)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                return Err(Error::Config(
                    "enable.auto.commit and enable.auto.offset.store belong to the glue (false)",
                ));
            }
        }
        if config.get("group.id").is_none() {
            return Err(Error::Config("group.id is required"));
        }
        let Some(servers) = config.get("bootstrap.servers").map(str::to_owned) else {
            return Err(Error::Config("bootstrap.servers is required"));
        };
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let shared = Arc::new(Shared::default());
        let consumer: StreamConsumer<GlueContext> = config
            .create_with_context(GlueContext {
                shared: Arc::clone(&shared),
            })
            .map_err(Error::kafka("create consumer"))?;
        let producer_config = self.producer_config.unwrap_or_else(|| {
            let mut p = ClientConfig::new();
            p.set("bootstrap.servers", &servers)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("message.timeout.ms", "30000");
            p
        });
        let producer: FutureProducer = producer_config
            .create()
            .map_err(Error::kafka("create producer"))?;
        Ok(Glue {
            inner: Arc::new(Inner {
                consumer,
                producer,
                policy: self.policy,
                dead_letter_suffix: self.dead_letter_suffix,
                max_buffered: self.max_buffered,
                shared,
                on_settled: self.on_settled,
                used: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }
}
