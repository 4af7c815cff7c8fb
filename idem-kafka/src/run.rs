//! The consumer loop: one worker task per assigned partition, each handling its records in
//! offset order and committing each one once it is final.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use idem_runtime::ack::{DeadLetterReason, Decision, RetryReason};
use idem_runtime::{Report, observe};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::{End, Error, Glue, Inner, Settled, Stats, bump, lock};

/// How often a waiting worker looks whether its partition is still its own.
const LIVENESS_TICK: Duration = Duration::from_millis(50);

/// How often the loop confirms its commits (a synchronous commit of the final offsets the
/// broker has not confirmed yet).
const CONFIRM_TICK: Duration = Duration::from_secs(1);

/// One synchronous commit of the final offsets not confirmed yet, on the blocking pool.
type Confirming = tokio::task::JoinHandle<(Vec<(String, i32, i64)>, Result<(), KafkaError>)>;

/// At each tick: take the answer of the last confirmation commit, and start the next one when
/// final offsets are not confirmed yet (one at a time; a broker that is away holds it until it
/// answers, and then it is sent again).
async fn confirm(inner: &Arc<Inner>, finals: &Finals, job: &mut Option<Confirming>) {
    if let Some(running) = job {
        if !running.is_finished() {
            return;
        }
        if let Ok((sent, result)) = job.take().expect("a job").await {
            match result {
                Ok(()) => {
                    bump(&inner.shared.stats.commits_confirmed);
                    let mut confirmed = lock(&inner.shared.confirmed);
                    for (topic, partition, next) in sent {
                        let slot = confirmed.entry((topic, partition)).or_insert(next);
                        *slot = (*slot).max(next);
                    }
                }
                Err(error) => {
                    bump(&inner.shared.stats.commit_failures);
                    tracing::warn!(broker = "kafka", %error, "an offset commit failed: it is sent again");
                }
            }
        }
    }
    let pending: Vec<(String, i32, i64)> = {
        let confirmed = lock(&inner.shared.confirmed);
        owned_finals(inner, finals)
            .into_iter()
            .filter(|(t, p, next)| confirmed.get(&(t.clone(), *p)) != Some(next))
            .collect()
    };
    if pending.is_empty() {
        return;
    }
    let inner = Arc::clone(inner);
    *job = Some(tokio::task::spawn_blocking(move || {
        let tpl = tpl_of(&pending);
        let result = inner.consumer.commit(&tpl, CommitMode::Sync);
        (pending, result)
    }));
}

fn tpl_of(offsets: &[(String, i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, next) in offsets {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
    }
    tpl
}

/// The last final offset (+ 1) of each partition whose worker still owns it.
fn owned_finals(inner: &Inner, finals: &Finals) -> Vec<(String, i32, i64)> {
    lock(finals)
        .iter()
        .filter(|((topic, partition), (epoch, _))| {
            inner.shared.is_current(topic, *partition, *epoch)
        })
        .map(|((topic, partition), (_, next))| (topic.clone(), *partition, *next))
        .collect()
}

/// The last final offset (+ 1) each worker committed, with its assignment epoch.
type Finals = Arc<std::sync::Mutex<HashMap<(String, i32), (u64, i64)>>>;

/// The flow control of one partition's worker.
#[derive(Default)]
struct Flow {
    waiting: AtomicUsize,
    paused: AtomicBool,
}

struct Worker {
    tx: mpsc::UnboundedSender<OwnedMessage>,
    epoch: u64,
    flow: Arc<Flow>,
}

/// What a worker needs to know whether it may go on.
#[derive(Clone)]
struct Life {
    inner: Arc<Inner>,
    topic: Arc<str>,
    partition: i32,
    epoch: u64,
    stopping: Arc<AtomicBool>,
}

impl Life {
    /// The partition is still this worker's (same assignment epoch).
    fn owned(&self) -> bool {
        self.inner
            .shared
            .is_current(&self.topic, self.partition, self.epoch)
    }

    /// A new record (or a new try) may start.
    fn live(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed) && self.owned()
    }

    /// Sleep `d`, in ticks; `false` as soon as the worker may not go on.
    async fn sleep(&self, d: Duration) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            if !self.live() {
                return false;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return true;
            }
            tokio::time::sleep((until - now).min(LIVENESS_TICK)).await;
        }
    }

    fn tpl(&self, offset: Option<i64>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        match offset {
            Some(o) => {
                // Only fails for an invalid offset; `o` is a record's offset + 1.
                let _ = tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(o));
            }
            None => {
                tpl.add_partition(&self.topic, self.partition);
            }
        }
        tpl
    }
}

impl Glue {
    /// Consume until a fatal error, handling each record with `handler` and committing what is
    /// final. `handler` is the consumer's work for one record: take the business key from it,
    /// call the idempotent handler, commit its transaction. It is called again for a retry in
    /// place, so it is a closure the glue can call more than once.
    ///
    /// Dropping this future aborts the handlers where they are (as a crash would); stop with
    /// [`run_until`](Self::run_until) to let them finish. A glue runs one loop, once: a second
    /// call is [`Error::LoopUsed`]; to consume again, build a new glue.
    ///
    /// ```no_run
    /// # async fn f(glue: idem_kafka::Glue) -> Result<(), idem_kafka::Error> {
    /// use rdkafka::Message;
    /// glue.run(|record| async move {
    ///     let order_id: u64 = std::str::from_utf8(record.key().unwrap_or_default())
    ///         .ok()
    ///         .and_then(|k| k.parse().ok())
    ///         .ok_or("a record without an order id")?;
    ///     # let _ = order_id;
    ///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn run<H, Fut, T, E>(&self, handler: H) -> Result<Stats, Error>
    where
        H: Fn(Arc<OwnedMessage>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        self.run_until(handler, std::future::pending()).await
    }

    /// As [`run`](Self::run), until `shutdown` completes; then no new record is started, each
    /// partition's worker finishes the record it has (a retry in place is abandoned), the final
    /// offsets are committed synchronously, and the counters are returned.
    ///
    /// ```no_run
    /// # async fn f(glue: idem_kafka::Glue) -> Result<(), idem_kafka::Error> {
    /// let stats = glue
    ///     .run_until(
    ///         |_record| async { Ok::<(), std::io::Error>(()) },
    ///         async { let _ = tokio::signal::ctrl_c().await; },
    ///     )
    ///     .await?;
    /// println!("{} records done", stats.done);
    /// # Ok(()) }
    /// ```
    pub async fn run_until<H, Fut, T, E, S>(&self, handler: H, shutdown: S) -> Result<Stats, Error>
    where
        H: Fn(Arc<OwnedMessage>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
        S: Future<Output = ()>,
    {
        // One loop per glue, ever (see `Error::LoopUsed`).
        if self.inner.used.swap(true, Ordering::AcqRel) {
            return Err(Error::LoopUsed);
        }
        let handler = Arc::new(handler);
        let stopping = Arc::new(AtomicBool::new(false));
        let finals: Finals = Arc::default();
        let mut workers: HashMap<(String, i32), Worker> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(CONFIRM_TICK);
        let mut confirming: Option<Confirming> = None;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let inner = &self.inner;
        // Which partition each worker task works for, to name the one that died.
        let mut task_partitions: HashMap<tokio::task::Id, (String, i32)> = HashMap::new();
        let fatal = 'run: loop {
            while let Some(joined) = tasks.try_join_next_with_id() {
                match joined {
                    Ok((id, ())) => {
                        task_partitions.remove(&id);
                    }
                    Err(e) => {
                        tracing::error!(broker = "kafka", error = %e, "a partition worker failed");
                        // Its queued records are gone: stop before anything commits past them.
                        let (topic, partition) =
                            task_partitions.remove(&e.id()).unwrap_or_default();
                        break 'run Some(Error::WorkerFailed { topic, partition });
                    }
                }
            }
            let received = tokio::select! {
                biased;
                () = &mut shutdown => break None,
                _ = tick.tick() => {
                    confirm(inner, &finals, &mut confirming).await;
                    continue;
                }
                m = inner.consumer.recv() => m,
            };
            let msg = match received {
                Ok(m) => m.detach(),
                Err(error) => {
                    bump(&inner.shared.stats.consume_errors);
                    if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
                        break Some(Error::Kafka {
                            op: "consume",
                            source: error,
                        });
                    }
                    tracing::warn!(broker = "kafka", %error, "the consumer reported an error");
                    continue;
                }
            };
            bump(&inner.shared.stats.records);
            let topic = msg.topic().to_owned();
            let partition = msg.partition();
            let epoch = inner.shared.epoch_for(&topic, partition);
            let key = (topic, partition);
            let fresh = match workers.get(&key) {
                // A worker of this assignment whose channel is closed died (a panic outside the
                // handler, in `on_settled`): the records it had queued are gone, and a fresh
                // worker would commit past them. Stop; the next owner starts from the commits.
                Some(w) if w.epoch == epoch && w.tx.is_closed() => {
                    break Some(Error::WorkerFailed {
                        topic: key.0.clone(),
                        partition,
                    });
                }
                Some(w) => w.epoch != epoch,
                None => true,
            };
            if fresh {
                let (tx, rx) = mpsc::unbounded_channel();
                let flow = Arc::new(Flow::default());
                let life = Life {
                    inner: Arc::clone(inner),
                    topic: Arc::from(key.0.as_str()),
                    partition,
                    epoch,
                    stopping: Arc::clone(&stopping),
                };
                if let Some(old) = workers.insert(
                    key.clone(),
                    Worker {
                        tx,
                        epoch,
                        flow: Arc::clone(&flow),
                    },
                ) {
                    // Its channel closes here: it drops what it has queued. Its pause (if any)
                    // belonged to the old assignment.
                    if old.flow.paused.load(Ordering::Relaxed) {
                        let _ = inner.consumer.resume(&life.tpl(None));
                    }
                }
                let task = tasks.spawn(worker(
                    life,
                    Arc::clone(&handler),
                    rx,
                    flow,
                    Arc::clone(&finals),
                ));
                task_partitions.insert(task.id(), key.clone());
            }
            let Some(w) = workers.get(&key) else {
                continue;
            };
            let waiting = w.flow.waiting.fetch_add(1, Ordering::Relaxed) + 1;
            if waiting > inner.max_buffered && !w.flow.paused.swap(true, Ordering::Relaxed) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                match inner.consumer.pause(&tpl) {
                    Ok(()) => bump(&inner.shared.stats.pauses),
                    Err(error) => {
                        tracing::debug!(broker = "kafka", %error, "could not pause a partition");
                    }
                }
            }
            if w.tx.send(msg).is_err() {
                // It died between the look above and this record (as above).
                bump(&inner.shared.stats.abandoned);
                break Some(Error::WorkerFailed {
                    topic: key.0.clone(),
                    partition,
                });
            }
        };
        // Stop: no new record starts; the workers finish the one they have.
        stopping.store(true, Ordering::Relaxed);
        drop(workers);
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(broker = "kafka", error = %e, "a partition worker failed");
            }
        }
        if let Some(error) = fatal {
            return Err(error);
        }
        // The last final offset of each partition still owned, committed synchronously.
        let last = owned_finals(inner, &finals);
        if !last.is_empty() {
            let (tpl, shared) = (tpl_of(&last), Arc::clone(inner));
            let committed =
                tokio::task::spawn_blocking(move || shared.consumer.commit(&tpl, CommitMode::Sync))
                    .await
                    .map_err(|_| Error::Kafka {
                        op: "commit",
                        source: KafkaError::Canceled,
                    })?;
            if let Err(error) = committed {
                bump(&inner.shared.stats.commit_failures);
                return Err(Error::Kafka {
                    op: "commit",
                    source: error,
                });
            }
            bump(&inner.shared.stats.commits_confirmed);
            let mut confirmed = lock(&inner.shared.confirmed);
            for (topic, partition, next) in last {
                confirmed.insert((topic, partition), next);
            }
        }
        Ok(self.stats())
    }
}

/// One partition's worker: its records in offset order, each committed once final.
async fn worker<H, Fut, T, E>(
    life: Life,
    handler: Arc<H>,
    mut rx: mpsc::UnboundedReceiver<OwnedMessage>,
    flow: Arc<Flow>,
    finals: Finals,
) where
    H: Fn(Arc<OwnedMessage>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let inner = Arc::clone(&life.inner);
    let stats = &inner.shared.stats;
    while let Some(msg) = rx.recv().await {
        let waiting = flow
            .waiting
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        if waiting <= inner.max_buffered / 2
            && flow.paused.swap(false, Ordering::Relaxed)
            && let Err(error) = inner.consumer.resume(&life.tpl(None))
        {
            tracing::debug!(broker = "kafka", %error, "could not resume a partition");
        }
        let offset = msg.offset();
        let msg = Arc::new(msg);
        let (mut end, runs) = if life.live() {
            handle(&life, &*handler, &msg).await
        } else {
            (End::Abandoned, 0)
        };
        if !matches!(end, End::Abandoned) {
            if life.owned() {
                let next = offset + 1;
                bump(&stats.commits_requested);
                if let Err(error) = inner
                    .consumer
                    .commit(&life.tpl(Some(next)), CommitMode::Async)
                {
                    bump(&stats.commit_failures);
                    tracing::warn!(broker = "kafka", topic = %life.topic, partition = life.partition, %error, "could not send an offset commit");
                }
                lock(&finals).insert((life.topic.to_string(), life.partition), (life.epoch, next));
            } else {
                // Final, but the partition is no longer ours: the new owner replays it.
                end = End::Abandoned;
            }
        }
        if matches!(end, End::Abandoned) {
            bump(&stats.abandoned);
        }
        if let Some(f) = &inner.on_settled {
            f(&Settled {
                topic: life.topic.to_string(),
                partition: life.partition,
                offset,
                runs,
                end,
            });
        }
    }
}

/// Run the handler on one record until its outcome is final (or the worker must stop).
async fn handle<H, Fut, T, E>(life: &Life, handler: &H, msg: &Arc<OwnedMessage>) -> (End, u32)
where
    H: Fn(Arc<OwnedMessage>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let inner = &life.inner;
    let stats = &inner.shared.stats;
    let (mut failures, mut deferrals, mut runs) = (0u32, 0u32, 0u32);
    loop {
        if !life.live() {
            return (End::Abandoned, runs);
        }
        runs += 1;
        bump(&stats.runs);
        // The handler is called on the first poll, inside `catch_unwind`: a closure that panics
        // before it returns its future (an `unwrap` outside its `async` block) is a failure of
        // the handler too, never a dead worker.
        let mut work = std::pin::pin!(None::<Fut>);
        // A panic inside the handler is a failure of it, caught inside `observe` so that the
        // report of the call that panicked is kept.
        let caught = std::future::poll_fn(|cx| {
            match catch_unwind(AssertUnwindSafe(|| {
                if work.is_none() {
                    work.set(Some(handler(Arc::clone(msg))));
                }
                work.as_mut()
                    .as_pin_mut()
                    .expect("the handler's future")
                    .poll(cx)
            })) {
                Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(_panic) => Poll::Ready(Err(())),
            }
        });
        let (out, report) = observe(caught).await;
        if out.is_err() {
            tracing::error!(broker = "kafka", topic = %life.topic, partition = life.partition, offset = msg.offset(), "the handler panicked");
        }
        let handler_ok = matches!(out, Ok(Ok(_)));
        // The handler's output and error are not kept (nor printed: they may quote the key).
        drop(out);
        let outcome = report.as_ref().map(|r| r.outcome);
        let decision =
            inner
                .policy
                .decide(outcome, handler_ok, failures.saturating_add(1), deferrals);
        let (after, reason) = match decision {
            Decision::Ack => {
                bump(&stats.done);
                return (End::Committed { outcome }, runs);
            }
            Decision::DeadLetter { reason } => {
                let failures = match reason {
                    DeadLetterReason::HandlerFailed { attempts } => attempts,
                    _ => failures,
                };
                return match dead_letter(life, msg, reason, failures, report.as_ref()).await {
                    Some(topic) => (End::DeadLettered { reason, topic }, runs),
                    None => (End::Abandoned, runs),
                };
            }
            Decision::Retry { after, reason } => (after, reason),
            // A decision this version does not know: keep the record, try again later.
            _ => (inner.policy.backoff, RetryReason::Unsettled),
        };
        match reason {
            RetryReason::HandlerFailed { attempt } => {
                failures = attempt;
                bump(&stats.failure_retries);
            }
            RetryReason::InFlight => {
                deferrals = deferrals.saturating_add(1);
                bump(&stats.in_flight_retries);
            }
            _ => {
                deferrals = deferrals.saturating_add(1);
                bump(&stats.unsettled_retries);
            }
        }
        tracing::debug!(
            broker = "kafka",
            topic = %life.topic,
            partition = life.partition,
            offset = msg.offset(),
            reason = reason.as_str(),
            after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            "retrying in place"
        );
        if !life.sleep(after).await {
            return (End::Abandoned, runs);
        }
    }
}

/// Copy the record to its dead-letter topic and wait for the broker's acknowledgement, trying
/// again after the policy's first pause for as long as the partition is this worker's. `None`:
/// it had to stop first (nothing may be committed then).
async fn dead_letter(
    life: &Life,
    msg: &OwnedMessage,
    reason: DeadLetterReason,
    failures: u32,
    report: Option<&Report>,
) -> Option<String> {
    let inner = &life.inner;
    let topic = format!("{}{}", msg.topic(), inner.dead_letter_suffix);
    let (partition, offset) = (msg.partition().to_string(), msg.offset().to_string());
    let (reason_text, failures) = (reason.to_string(), failures.to_string());
    let mut headers = msg
        .headers()
        .cloned()
        .unwrap_or_else(OwnedHeaders::new)
        .insert(header("idem-reason", reason.as_str()))
        .insert(header("idem-reason-text", &reason_text))
        .insert(header("idem-topic", msg.topic()))
        .insert(header("idem-partition", &partition))
        .insert(header("idem-offset", &offset))
        .insert(header("idem-failures", &failures));
    let key = report.and_then(|r| r.key.as_ref()).map(|k| k.to_string());
    if let Some(r) = report {
        headers = headers.insert(header("idem-scope", &r.scope));
    }
    if let Some(k) = &key {
        headers = headers.insert(header("idem-key", k));
    }
    loop {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers.clone());
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        match inner.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => {
                bump(&inner.shared.stats.dead_letters);
                tracing::warn!(
                    broker = "kafka",
                    topic = %life.topic,
                    partition = life.partition,
                    offset = msg.offset(),
                    key = key.as_deref().unwrap_or("-"),
                    reason = %reason,
                    dead_letter_topic = %topic,
                    "dead-lettered a record"
                );
                return Some(topic);
            }
            Err((error, _)) => {
                bump(&inner.shared.stats.dead_letter_failures);
                tracing::warn!(
                    broker = "kafka",
                    dead_letter_topic = %topic,
                    %error,
                    "the broker did not take a dead letter: the record is not committed, trying again"
                );
                if !life.sleep(inner.policy.backoff).await {
                    return None;
                }
            }
        }
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
