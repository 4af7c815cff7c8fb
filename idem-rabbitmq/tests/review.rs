//! An outside review of the glue (issue 17): paths where a delivery bounces, is dropped, is
//! dead-lettered as a failure although its key was only in flight, or is acked although what the
//! consumer did after its idempotent call failed. Against the real RabbitMQ; each test is named
//! after what breaks, and fails on the code it was written against.
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_rabbitmq::{QueueKind, Settled};
use idem_runtime::ack::{Policy, RetryReason};
use idem_runtime::{CallOutcome, MemoryStore, idempotent, observe};
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Consumer};
use tokio::sync::{Notify, oneshot};

use support::*;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error("failed after the call")]
    After,
    #[error("the handler failed")]
    Failed,
}

/// Holds its key until `gate` is notified; says when it has the key (`started`).
#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.review.held")]
async fn held(
    store: &MemoryStore,
    key: &str,
    gate: Arc<Notify>,
    started: Option<oneshot::Sender<()>>,
) -> Result<u64, AppError> {
    if let Some(started) = started {
        let _ = started.send(());
    }
    gate.notified().await;
    Ok(2)
}

#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.review.plain")]
async fn plain(store: &MemoryStore, key: &str, fail: bool) -> Result<u64, AppError> {
    if fail {
        return Err(AppError::Failed);
    }
    Ok(1)
}

#[idempotent(
    key = "key",
    store = "store",
    scope = "idem_rabbitmq.review.big",
    max_output = "1KiB"
)]
async fn big_output(store: &MemoryStore, key: &str) -> Result<String, AppError> {
    Ok("x".repeat(4096))
}

/// A holder of `key`, parked in its handler until the returned gate is notified.
async fn holder(
    store: &MemoryStore,
    key: &str,
) -> (Arc<Notify>, tokio::task::JoinHandle<Result<u64, AppError>>) {
    let gate = Arc::new(Notify::new());
    let (started_tx, started) = oneshot::channel();
    let task = {
        let (store, key, gate) = (store.clone(), key.to_owned(), gate.clone());
        tokio::spawn(async move { held(&store, &key, gate, Some(started_tx)).await })
    };
    started.await.unwrap();
    (gate, task)
}

async fn consumer(channel: &lapin::Channel, queue: &str) -> Consumer {
    channel
        .basic_qos(4, BasicQosOptions::default())
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn next_within(consumer: &mut Consumer, d: Duration) -> Option<lapin::message::Delivery> {
    tokio::time::timeout(d, consumer.next())
        .await
        .ok()
        .flatten()
        .map(|d| d.unwrap())
}

/// A delay queue the glue has declared once is never declared again (`Inner::declared`). When it
/// is gone (an operator's clean-up, an `expires` policy on idle queues: the delay queues are idle
/// most of the time), the next copy is returned as unroutable, and the glue answers with
/// `basic.nack(requeue)`: the in-flight duplicate comes straight back, over and over, exactly the
/// busy loop the glue exists to prevent, and on a quorum queue each bounce burns one of its
/// `x-delivery-limit` deliveries until the broker dead-letters a message whose key was only in
/// flight (the holder may still fail: then its effect never happens).
#[tokio::test]
async fn an_in_flight_duplicate_bounces_without_pause_and_burns_the_delivery_limit_once_its_delay_queue_is_gone()
 {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv_delay_gone");
    // One delay length, so that every deferral uses the same delay queue.
    let policy = Policy::default().in_flight(Duration::from_millis(50), Duration::from_millis(50));
    let (channel, glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, policy).await;
    let key = unique("k");
    let (gate, holder_task) = holder(&store, &key).await;
    publish(&channel, &queue, "m-1", b"{}").await;
    let mut c = consumer(&channel, &queue).await;

    // A first deferral declares the delay queue; the copy comes back through it.
    let d = next_within(&mut c, Duration::from_secs(20)).await.unwrap();
    let s = glue
        .settle(&d, held(&store, &key, gate.clone(), None))
        .await
        .unwrap();
    assert!(
        matches!(
            s,
            Settled::Redelivered {
                reason: RetryReason::InFlight,
                ..
            }
        ),
        "{s:?}"
    );
    let mut d = next_within(&mut c, Duration::from_secs(20)).await.unwrap();
    // Now the (empty) delay queue goes away.
    let (delay_queue, _) = glue.topology().delay_queue(Duration::from_millis(50));
    channel
        .queue_delete(delay_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    // The holder still runs: every delivery of the duplicate must wait at least the policy's
    // pause (50 ms) before it comes back.
    let mut errors = Vec::new();
    let mut without_pause = 0;
    let mut deliveries = 1;
    let started = Instant::now();
    loop {
        let settled_at = Instant::now();
        if let Err(e) = glue
            .settle(&d, held(&store, &key, gate.clone(), None))
            .await
        {
            errors.push(e.to_string());
        }
        match next_within(&mut c, Duration::from_secs(2)).await {
            Some(again) => {
                if settled_at.elapsed() < Duration::from_millis(50) {
                    without_pause += 1;
                }
                deliveries += 1;
                d = again;
            }
            None => break,
        }
        if deliveries > 40 || started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let dead = ready(&conn, glue.topology().dead_letter_queue()).await;
    gate.notify_one();
    let _ = holder_task.await;
    delete_all(&channel, &queue).await;
    errors.dedup();
    assert!(
        without_pause == 0 && dead == 0,
        "while its key was in flight the duplicate came back {without_pause} times without the \
         policy's pause ({deliveries} deliveries in {:?}), and {dead} message(s) were \
         dead-lettered by the broker's delivery limit; settle said: {errors:?}",
        started.elapsed()
    );
}

/// The dead-letter queue is declared once, at `build`. When it is gone, a poison message's copy
/// is returned as unroutable, the glue nacks the original with requeue, and the poison message
/// bounces; on a quorum queue the broker's delivery limit then dead-letters it itself, to the
/// same missing queue: the message is dropped, with no copy anywhere.
#[tokio::test]
async fn a_poison_message_is_lost_when_the_dead_letter_queue_is_gone() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv_dlq_gone");
    let (channel, glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let dlq = glue.topology().dead_letter_queue().to_owned();
    channel
        .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    publish(&channel, &queue, "poison", b"{}").await;
    let mut c = consumer(&channel, &queue).await;
    let mut deliveries = 0;
    let mut errors = Vec::new();
    // An empty key: dead-lettered at once (a redelivery would be answered the same way).
    while let Some(d) = next_within(&mut c, Duration::from_secs(2)).await {
        deliveries += 1;
        if let Err(e) = glue.settle(&d, plain(&store, "", false)).await {
            errors.push(e.to_string());
        }
        if deliveries > 100 {
            break;
        }
    }
    let in_queue = ready(&conn, &queue).await;
    let in_dlq = ready(&conn, &dlq).await;
    delete_all(&channel, &queue).await;
    errors.dedup();
    assert!(
        in_queue + in_dlq == 1,
        "the poison message is gone: {in_queue} left in the queue, {in_dlq} in `{dlq}`, after \
         {deliveries} deliveries; settle said: {errors:?}"
    );
}

/// With `QueueKind::Classic`, the copies the glue parks in its delay and dead-letter queues keep
/// the original's `delivery_mode`. A publisher that relies on a quorum queue (which persists every
/// message) leaves it unset: the copy is then a transient message in a classic queue, which
/// RabbitMQ drops on a restart, after the glue has acked the original. The copy must be
/// persistent whatever the original was.
#[tokio::test]
async fn a_copy_in_a_classic_delay_queue_is_transient_and_does_not_survive_a_broker_restart() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv_transient");
    let glue = idem_rabbitmq::Glue::builder(&queue)
        .queue_kind(QueueKind::Classic)
        .policy(Policy::default().backoff(Duration::from_secs(60), Duration::from_secs(60)))
        .build(&conn)
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = glue.topology().queue_arguments();
    args.insert("x-queue-type".into(), text("quorum"));
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    // A producer that leaves delivery_mode unset: the quorum queue keeps it on disk anyway.
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_message_id("m-1".into()),
        )
        .await
        .unwrap();
    let mut c = consumer(&channel, &queue).await;
    let d = next_within(&mut c, Duration::from_secs(20)).await.unwrap();
    let s = glue
        .settle(&d, plain(&store, &unique("k"), true))
        .await
        .unwrap();
    assert!(matches!(s, Settled::Redelivered { .. }), "{s:?}");
    // The original is acked; the only copy left is in the delay queue.
    let (delay_queue, _) = glue.topology().delay_queue(Duration::from_secs(60));
    let copy = channel
        .basic_get(
            delay_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the copy in the delay queue");
    let mode = *copy.delivery.properties.delivery_mode();
    delete_all(&channel, &queue).await;
    assert_eq!(
        mode,
        Some(2),
        "the only copy of an acked message sits in the classic queue `{delay_queue}` as a \
         transient message (delivery_mode {mode:?}): a broker restart drops it"
    );
}

/// `settle` reads the report of an `observe` of its own. A consumer that observes its call too
/// (to log whether it was a first run or a replay, as the README shows) takes the report: the
/// glue then sees no idempotent call and an `Err`, so an in-flight duplicate is counted as a
/// handler failure, backed off as one, and dead-lettered after `max_attempts` while its holder
/// still runs.
#[tokio::test]
async fn an_in_flight_duplicate_is_counted_as_a_failure_when_the_consumer_observes_its_own_call() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv_nested_observe");
    let policy = Policy::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(50), Duration::from_millis(50))
        .in_flight(Duration::from_millis(50), Duration::from_millis(50));
    let (channel, glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, policy).await;
    let key = unique("k");
    let (gate, holder_task) = holder(&store, &key).await;
    publish(&channel, &queue, "m-1", b"{}").await;
    let mut c = consumer(&channel, &queue).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let Some(d) = next_within(&mut c, Duration::from_secs(5)).await else {
            break;
        };
        let s = glue
            .settle(&d, async {
                let (result, report) = observe(held(&store, &key, gate.clone(), None)).await;
                // The consumer's own log line: first run, replay, in flight...
                let outcome = report.map(|r| r.outcome);
                assert!(
                    matches!(outcome, Some(CallOutcome::InFlight { .. })),
                    "{outcome:?}"
                );
                result
            })
            .await
            .unwrap();
        seen.push(s);
    }
    gate.notify_one();
    let _ = holder_task.await;
    delete_all(&channel, &queue).await;
    assert!(
        seen.len() == 3
            && seen.iter().all(|s| matches!(
                s,
                Settled::Redelivered {
                    reason: RetryReason::InFlight,
                    ..
                }
            )),
        "an in-flight duplicate, while its holder runs, was settled as {seen:?}"
    );
}

/// The README maps `Unreplayable` to "MQ: ack", so a consumer goes on after it; what it does next
/// (its commit, a second step) can still fail. `Policy::decide` acks `Unreplayable` whatever the
/// future returned: the failed step is acked and never retried. (`Executed` and `Replayed`
/// followed by a failure are retried: "nothing is acked that did not commit".)
#[tokio::test]
async fn a_failure_after_an_unreplayable_call_is_acked() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv_unreplayable");
    let (channel, glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let key = unique("k");
    publish(&channel, &queue, "m-1", b"{}").await;
    publish(&channel, &queue, "m-2", b"{}").await;
    let mut c = consumer(&channel, &queue).await;
    let work = || async {
        match big_output(&store, &key).await {
            // Done once already, only its output is missing: go on, as the README says.
            Ok(_) | Err(AppError::Idem(idem_runtime::Error::Unreplayable { .. })) => {}
            Err(e) => return Err(e),
        }
        // The next step (a commit, a second call) fails.
        Err::<(), _>(AppError::After)
    };
    let d = next_within(&mut c, Duration::from_secs(20)).await.unwrap();
    let first = glue.settle(&d, work()).await.unwrap();
    let d = next_within(&mut c, Duration::from_secs(20)).await.unwrap();
    let second = glue.settle(&d, work()).await.unwrap();
    delete_all(&channel, &queue).await;
    assert!(
        matches!(first, Settled::Redelivered { .. }),
        "Executed, then a failure: {first:?}"
    );
    assert!(
        !matches!(second, Settled::Acked { .. }),
        "Unreplayable, then a failure: {second:?}: acked, the failed step is never retried"
    );
}
