//! The articles' scenarios against the real broker, one consumer in this process: a producer
//! retry, a handler that fails then succeeds, a poison message, a handler that always fails.
//! Effects are counted in PostgreSQL. (The scenarios with several consumer processes, and
//! SIGKILLs, are in processes.rs.)
mod common;
mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_rabbitmq::{Glue, QueueKind, Settled, headers};
use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy, RetryReason};
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use common::*;
use support::*;

type Work<'a> = Pin<Box<dyn Future<Output = Result<i64, AppError>> + Send + 'a>>;

/// What one settle did, as the consumer saw it.
#[derive(Debug)]
struct Seen {
    failures: Option<i64>,
    settled: Settled,
    at: Instant,
}

/// Consume `queue` with `glue` (prefetch 16) until `done` says so, settling each delivery with
/// `work`. Fails after 60 s.
async fn consume<'e>(
    channel: &Channel,
    glue: &Glue,
    queue: &str,
    done: impl Fn(&[Seen]) -> bool,
    mut work: impl FnMut(Vec<u8>) -> Work<'e>,
) -> Vec<Seen> {
    channel
        .basic_qos(16, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&seen) {
        let next = tokio::time::timeout_at(deadline.into(), consumer.next()).await;
        let delivery = next
            .expect("the scenario did not finish in 60 s")
            .unwrap()
            .unwrap();
        let settled = glue
            .settle(&delivery, work(delivery.data.clone()))
            .await
            .unwrap();
        seen.push(Seen {
            failures: header_int(&delivery, headers::FAILURES),
            settled,
            at: Instant::now(),
        });
    }
    seen
}

fn acks(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| matches!(s.settled, Settled::Acked { .. }))
        .count()
}

fn redeliveries(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| matches!(s.settled, Settled::Redelivered { .. }))
        .count()
}

struct Servers {
    conn: lapin::Connection,
    pool: idem_runtime::sqlx::PgPool,
}

async fn servers() -> Option<Servers> {
    Some(Servers {
        conn: rabbit().await?,
        pool: pg().await?,
    })
}

/// Scenario 1: A producer publishes one order twice, each time with a new message id: one effect; the
/// second delivery is acked as a replay.
#[tokio::test]
async fn producer_retry_with_a_new_message_id_has_one_effect() {
    let Some(s) = servers().await else { return };
    let (queue, run, effects, table) = (
        unique("idem_rmq_producer"),
        unique("run"),
        unique("eff"),
        unique("idem_rmq"),
    );
    create_effects(&s.pool, &effects).await;
    let store = pg_store(&s.pool, &table).await;
    let (channel, glue) = fresh_queue(&s.conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let body = serde_json::to_vec(&Order {
        order_id: 1,
        amount: 10,
        pause_ms: 0,
    })
    .unwrap();
    publish(&channel, &queue, "msg-a", &body).await;
    publish(&channel, &queue, "msg-b", &body).await;
    let (pool, store_ref) = (&s.pool, &store);
    let (run_ref, eff_ref) = (run.as_str(), effects.as_str());
    let seen = consume(
        &channel,
        &glue,
        &queue,
        |seen| seen.len() == 2,
        |body| {
            Box::pin(async move { handle_tx(pool, store_ref, run_ref, eff_ref, 0, &body).await })
        },
    )
    .await;
    let outcomes: Vec<_> = seen.iter().map(|s| s.settled).collect();
    assert_eq!(
        outcomes,
        [
            Settled::Acked {
                outcome: Some(CallOutcome::Executed)
            },
            Settled::Acked {
                outcome: Some(CallOutcome::Replayed)
            }
        ]
    );
    assert_eq!(effect_count(&s.pool, &effects).await, 1);
    assert_eq!(ready(&s.conn, &queue).await, 0);
    row(
        "1 producer retry, new message id",
        "PostgreSQL tx",
        seen.len(),
        1,
        acks(&seen),
        0,
        0,
    );
    delete_all(&channel, &queue).await;
    drop_table(&s.pool, &effects).await;
    drop_store(&s.pool, &table).await;
}

/// Counts a handler's runs per order in this process, and fails the first `n` of each.
#[derive(Default, Clone)]
struct FailFirst(Arc<Mutex<std::collections::HashMap<i64, u32>>>);

impl FailFirst {
    fn next(&self, order: i64, n: u32) -> bool {
        let mut runs = self.0.lock().unwrap();
        let r = runs.entry(order).or_default();
        *r += 1;
        *r <= n
    }
    fn runs(&self, order: i64) -> u32 {
        self.0.lock().unwrap().get(&order).copied().unwrap_or(0)
    }
}

/// Scenario 4: A handler that fails twice, then succeeds: redelivered through the delay queue with the
/// policy's back-off (100 ms, then 200 ms), the failure count carried on the copies; one effect.
#[tokio::test]
async fn handler_that_fails_then_succeeds_is_retried_with_back_off_and_has_one_effect() {
    let Some(s) = servers().await else { return };
    let Some(redis) = redis().await else { return };
    let (queue, run, effects) = (unique("idem_rmq_flaky"), unique("run"), unique("eff"));
    create_effects(&s.pool, &effects).await;
    let policy = Policy::default()
        .max_attempts(5)
        .backoff(Duration::from_millis(100), Duration::from_secs(1));
    let (channel, glue) = fresh_queue(&s.conn, &queue, QueueKind::Classic, policy).await;
    let body = serde_json::to_vec(&Order {
        order_id: 4,
        amount: 1,
        pause_ms: 0,
    })
    .unwrap();
    publish(&channel, &queue, "msg-4", &body).await;
    let fails = FailFirst::default();
    let (pool, redis, run_ref, eff_ref) = (&s.pool, &redis, run.as_str(), effects.as_str());
    let seen = consume(
        &channel,
        &glue,
        &queue,
        |seen| acks(seen) == 1,
        |body| {
            let fails = fails.clone();
            Box::pin(async move {
                let o: Order = serde_json::from_slice(&body)?;
                let fail = fails.next(o.order_id, 2);
                coupon_redis(redis, pool, run_ref, o.order_id, o.amount, eff_ref, fail).await
            })
        },
    )
    .await;
    let settled: Vec<_> = seen.iter().map(|s| s.settled).collect();
    assert_eq!(
        settled,
        [
            Settled::Redelivered {
                after: Duration::from_millis(100),
                reason: RetryReason::HandlerFailed { attempt: 1 }
            },
            Settled::Redelivered {
                after: Duration::from_millis(200),
                reason: RetryReason::HandlerFailed { attempt: 2 }
            },
            Settled::Acked {
                outcome: Some(CallOutcome::Executed)
            }
        ]
    );
    // The copies carry the failures; the pauses were waited out (the delay queue's TTL is the
    // pause rounded up to a power of two of milliseconds: 128 ms, 256 ms).
    assert_eq!(
        seen.iter().map(|s| s.failures).collect::<Vec<_>>(),
        [None, Some(1), Some(2)]
    );
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(128));
    assert!(seen[2].at - seen[1].at >= Duration::from_millis(256));
    assert_eq!(fails.runs(4), 3);
    assert_eq!(effect_count(&s.pool, &effects).await, 1);
    assert_eq!(
        ready(&s.conn, &queue).await + delayed(&s.conn, &queue).await,
        0
    );
    row(
        "4 fails twice, then succeeds",
        "Redis",
        seen.len(),
        1,
        acks(&seen),
        redeliveries(&seen),
        0,
    );
    delete_all(&channel, &queue).await;
    drop_table(&s.pool, &effects).await;
}

/// A tracing writer that keeps what was logged, to check the dead letter's WARN line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Scenario 5: A poison message: the same order again with another amount (`Mismatch`). Dead-lettered at
/// once (the handler does not run), with the WARN line (the key redacted), and kept in the
/// dead-letter queue with its body and reason headers.
#[tokio::test]
async fn poison_message_is_dead_lettered_at_once_with_a_log_line_and_kept() {
    let Some(s) = servers().await else { return };
    let Some(redis) = redis().await else { return };
    let (queue, run, effects) = (unique("idem_rmq_poison"), unique("run"), unique("eff"));
    create_effects(&s.pool, &effects).await;
    let (channel, glue) = fresh_queue(&s.conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let good = serde_json::to_vec(&Order {
        order_id: 5,
        amount: 10,
        pause_ms: 0,
    })
    .unwrap();
    let poison = serde_json::to_vec(&Order {
        order_id: 5,
        amount: 99,
        pause_ms: 0,
    })
    .unwrap();
    publish(&channel, &queue, "msg-good", &good).await;
    publish(&channel, &queue, "msg-poison", &poison).await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (pool, redis, run_ref, eff_ref) = (&s.pool, &redis, run.as_str(), effects.as_str());
    let seen = consume(
        &channel,
        &glue,
        &queue,
        |seen| seen.len() == 2,
        |body| {
            Box::pin(async move {
                let o: Order = serde_json::from_slice(&body)?;
                coupon_redis(redis, pool, run_ref, o.order_id, o.amount, eff_ref, false).await
            })
        },
    )
    .await;
    assert_eq!(
        seen[1].settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::Mismatch
        }
    );
    let dead = drain(&channel, glue.topology().dead_letter_queue()).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, poison, "the dead letter keeps its body");
    assert_eq!(
        header_text(&dead[0], headers::REASON).as_deref(),
        Some("mismatch")
    );
    assert_eq!(
        header_text(&dead[0], headers::SCOPE).as_deref(),
        Some("idem_rabbitmq.tests.coupon_redis")
    );
    assert!(
        header_text(&dead[0], headers::KEY)
            .unwrap()
            .starts_with("redacted:")
    );
    assert_eq!(
        dead[0].properties.message_id().as_ref().unwrap().as_str(),
        "msg-poison"
    );
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("dead-lettered"))
        .expect("a WARN line");
    assert!(
        line.contains("WARN") && line.contains("another payload"),
        "{line}"
    );
    assert!(
        line.contains("redacted:") && !line.contains(&format!("{run}:5")),
        "{line}"
    );
    assert_eq!(effect_count(&s.pool, &effects).await, 1);
    assert_eq!(ready(&s.conn, &queue).await, 0);
    row(
        "5 poison (same key, other payload)",
        "Redis",
        seen.len(),
        1,
        acks(&seen),
        0,
        dead.len(),
    );
    delete_all(&channel, &queue).await;
    drop_table(&s.pool, &effects).await;
}

/// Scenario 6: A handler that always fails is tried `max_attempts` (3) times, with back-off, then
/// dead-lettered with its body, the reason and the failure count.
#[tokio::test]
async fn handler_that_always_fails_ends_in_the_dead_letter_queue_after_max_attempts() {
    let Some(s) = servers().await else { return };
    let Some(redis) = redis().await else { return };
    let (queue, run, effects) = (unique("idem_rmq_failing"), unique("run"), unique("eff"));
    create_effects(&s.pool, &effects).await;
    let policy = Policy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(50), Duration::from_secs(1));
    let (channel, glue) = fresh_queue(&s.conn, &queue, QueueKind::Quorum, policy).await;
    let body = serde_json::to_vec(&Order {
        order_id: 6,
        amount: 1,
        pause_ms: 0,
    })
    .unwrap();
    publish(&channel, &queue, "msg-6", &body).await;
    let runs = FailFirst::default();
    let (pool, redis, run_ref, eff_ref) = (&s.pool, &redis, run.as_str(), effects.as_str());
    let seen = consume(
        &channel,
        &glue,
        &queue,
        |seen| {
            seen.iter()
                .any(|s| matches!(s.settled, Settled::DeadLettered { .. }))
        },
        |body| {
            let runs = runs.clone();
            Box::pin(async move {
                let o: Order = serde_json::from_slice(&body)?;
                let fail = runs.next(o.order_id, u32::MAX);
                coupon_redis(redis, pool, run_ref, o.order_id, o.amount, eff_ref, fail).await
            })
        },
    )
    .await;
    assert_eq!(seen.len(), 3);
    assert_eq!(runs.runs(6), 3, "the handler ran max_attempts times");
    assert_eq!(
        seen[2].settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 3 }
        }
    );
    let dead = drain(&channel, glue.topology().dead_letter_queue()).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, body);
    assert_eq!(
        header_text(&dead[0], headers::REASON).as_deref(),
        Some("handler_failed")
    );
    assert_eq!(header_int(&dead[0], headers::FAILURES), Some(3));
    assert_eq!(effect_count(&s.pool, &effects).await, 0);
    assert_eq!(
        ready(&s.conn, &queue).await + delayed(&s.conn, &queue).await,
        0
    );
    row(
        "6 always fails",
        "Redis",
        seen.len(),
        0,
        acks(&seen),
        redeliveries(&seen),
        dead.len(),
    );
    delete_all(&channel, &queue).await;
    drop_table(&s.pool, &effects).await;
}

/// A body that does not decode is the caller's `Err` before the handler: counted as a failure,
/// so it ends in the dead-letter queue after `max_attempts`, never dropped.
#[tokio::test]
async fn a_body_that_does_not_decode_ends_in_the_dead_letter_queue() {
    let Some(s) = servers().await else { return };
    let queue = unique("idem_rmq_garbage");
    let policy = Policy::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(10));
    let (channel, glue) = fresh_queue(&s.conn, &queue, QueueKind::Classic, policy).await;
    publish(&channel, &queue, "msg-garbage", b"not json").await;
    let seen = consume(
        &channel,
        &glue,
        &queue,
        |seen| seen.len() == 2,
        |body| {
            Box::pin(async move {
                let o: Order = serde_json::from_slice(&body)?;
                Ok(o.order_id)
            })
        },
    )
    .await;
    assert_eq!(
        seen[1].settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 2 }
        }
    );
    let dead = drain(&channel, glue.topology().dead_letter_queue()).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data, b"not json");
    assert!(
        header_text(&dead[0], headers::SCOPE).is_none(),
        "no idempotent call ran"
    );
    delete_all(&channel, &queue).await;
}
