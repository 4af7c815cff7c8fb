//! The articles' scenarios in one consumer process: a producer's retry, a handler that fails
//! then succeeds, a poison message, a handler that always fails, and a slow handler.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy};

use crate::support::{self, ConsumerSettings, OrderPaid, Orders, Tally};

/// A consumer loop: settle each message with `handle` until `done` says so, at most `limit`.
pub async fn consume<H, Fut>(
    orders: &Orders,
    glue: &Glue,
    limit: Duration,
    mut handle: H,
    mut done: impl FnMut(&Tally, &Settled) -> bool,
) -> (Tally, Vec<(Settled, u32, Instant)>)
where
    H: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<i64, crate::AppError>>,
{
    let mut messages = orders
        .consumer
        .stream()
        .max_messages_per_batch(16)
        .expires(Duration::from_secs(2))
        .heartbeat(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut log = Vec::new();
    loop {
        let left = limit
            .checked_sub(started.elapsed())
            .expect("the consumer loop timed out");
        let msg = tokio::time::timeout(left, messages.next())
            .await
            .expect("the consumer loop timed out")
            .expect("the message stream ended")
            .expect("a message");
        let delivered = support::delivered(&msg);
        let payload = msg.payload.to_vec();
        let settled = glue.settle(msg, || handle(payload.clone())).await.unwrap();
        tally.count(&settled, delivered);
        log.push((settled, delivered, Instant::now()));
        if done(&tally, &settled) {
            return (tally, log);
        }
    }
}

fn order(id: i64, amount: i64) -> OrderPaid {
    OrderPaid {
        id,
        user: 7,
        amount,
    }
}

/// A fresh order id for each test run (the effect tables are new, the ids need not be).
fn order_id() -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000) as i64
}

/// Scenario 1: The producer publishes one order twice (a retry after a lost publish ack: a new message
/// id each time): one effect, both messages acked, the second as a replay.
#[tokio::test]
async fn producer_retry_with_a_new_message_id_has_one_effect() {
    let Some(s) = support::servers().await else {
        return;
    };
    let orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let store = support::pg_store(&s.pool).await;
    let effects = support::effects_table(&s.pool).await;
    let glue = Glue::new(&orders.consumer);
    let o = order(order_id(), 500);
    orders.publish(&s.js, &o).await;
    orders.publish(&s.js, &o).await;

    let (mut tally, log) = consume(
        &orders,
        &glue,
        Duration::from_secs(30),
        |p| {
            let (store, effects) = (&store, &effects);
            async move { crate::on_order_paid_tx(store, &p, effects, 1).await }
        },
        |t, _| t.acks == 2,
    )
    .await;
    tally.effects = support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await;
    let outcomes: Vec<_> = log.iter().map(|(s, ..)| *s).collect();
    assert_eq!(
        outcomes,
        vec![
            Settled::Acked {
                outcome: Some(CallOutcome::Executed),
                held: 0
            },
            Settled::Acked {
                outcome: Some(CallOutcome::Replayed),
                held: 0
            },
        ]
    );
    assert_eq!(tally.effects, 1);
    let state = orders.state().await;
    assert_eq!(
        (state.num_pending, state.num_ack_pending),
        (0, 0),
        "everything acked"
    );
    tally.print(
        "1. producer retry, new message id",
        "PostgreSQL (tx attribute)",
    );
    orders.delete(&s.js).await;
    support::drop_pg_store(&s.pool, &store).await;
    support::exec(&s.pool, format!("DROP TABLE {effects}")).await;
}

/// Scenario 4: A handler that fails twice, then succeeds: redelivered with back-off (-NAK with the
/// policy's delay, doubling), one effect, then acked.
#[tokio::test]
async fn a_handler_that_fails_then_succeeds_is_retried_with_backoff_and_has_one_effect() {
    let Some(s) = support::servers().await else {
        return;
    };
    let Some(redis) = support::redis_store(&support::unique("idem_nats")).await else {
        return;
    };
    let orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let effects = support::effects_table(&s.pool).await;
    let backoff = Duration::from_millis(200);
    let glue = Glue::new(&orders.consumer)
        .policy(Policy::default().backoff(backoff, Duration::from_secs(5)));
    orders.publish(&s.js, &order(order_id(), 500)).await;
    let failures_left = AtomicU32::new(2);

    let (mut tally, log) = consume(
        &orders,
        &glue,
        Duration::from_secs(30),
        |p| {
            let (redis, pool, effects, f) = (&redis, &s.pool, &effects, &failures_left);
            async move { crate::on_order_paid(redis, pool, &p, effects, f).await }
        },
        |t, _| t.acks == 1,
    )
    .await;
    tally.effects = support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await;
    let settled: Vec<_> = log.iter().map(|(s, d, _)| (*s, *d)).collect();
    assert_eq!(
        settled,
        vec![
            (
                Settled::Redelivering {
                    after: backoff,
                    attempt: 1
                },
                1
            ),
            (
                Settled::Redelivering {
                    after: backoff * 2,
                    attempt: 2
                },
                2
            ),
            (
                Settled::Acked {
                    outcome: Some(CallOutcome::Executed),
                    held: 0
                },
                3
            ),
        ]
    );
    // The broker kept the delays: the redeliveries came no sooner than asked.
    assert!(log[1].2 - log[0].2 >= backoff, "{:?}", log[1].2 - log[0].2);
    assert!(
        log[2].2 - log[1].2 >= backoff * 2,
        "{:?}",
        log[2].2 - log[1].2
    );
    assert_eq!(tally.effects, 1);
    let state = orders.state().await;
    assert_eq!((state.num_pending, state.num_ack_pending), (0, 0));
    tally.print("4. fails twice, then succeeds", "Redis (plain attribute)");
    orders.delete(&s.js).await;
    support::exec(&s.pool, format!("DROP TABLE {effects}")).await;
}

/// Scenario 6: A handler that always fails: redelivered until `max_attempts` (3), then published to the
/// dead-letter stream with its body, headers and reason, and terminated.
#[tokio::test]
async fn a_handler_that_always_fails_ends_in_the_dead_letter_stream_after_max_attempts() {
    let Some(s) = support::servers().await else {
        return;
    };
    let Some(redis) = support::redis_store(&support::unique("idem_nats")).await else {
        return;
    };
    let orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let effects = support::effects_table(&s.pool).await;
    let glue = Glue::new(&orders.consumer).policy(
        Policy::default()
            .max_attempts(3)
            .backoff(Duration::from_millis(100), Duration::from_secs(1)),
    );
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    let o = order(order_id(), 500);
    orders.publish(&s.js, &o).await;
    let failures_left = AtomicU32::new(u32::MAX);

    let (mut tally, log) = consume(
        &orders,
        &glue,
        Duration::from_secs(30),
        |p| {
            let (redis, pool, effects, f) = (&redis, &s.pool, &effects, &failures_left);
            async move { crate::on_order_paid(redis, pool, &p, effects, f).await }
        },
        |_, s| matches!(s, Settled::DeadLettered { .. }),
    )
    .await;
    tally.effects = support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(
        log[2].0,
        Settled::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 3 }
        }
    );
    let dead = orders.dead_letters(&s.js).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "handler_failed");
    assert_eq!(serde_json::from_slice::<OrderPaid>(&dead[0].1).unwrap(), o);
    let h = &dead[0].2;
    assert_eq!(h.get(idem_nats::headers::DELIVERIES).unwrap().as_str(), "3");
    assert_eq!(
        h.get(idem_nats::headers::SCOPE).unwrap().as_str(),
        "nats.tests.coupon"
    );
    assert!(
        h.get("Idem-Original-Nats-Msg-Id").is_some(),
        "the original's message id is kept"
    );
    let state = orders.state().await;
    assert_eq!(
        (state.num_pending, state.num_ack_pending),
        (0, 0),
        "terminated, not pending"
    );
    assert_eq!(tally.effects, 0);
    tally.print("6. always fails", "Redis (plain attribute)");
    orders.delete(&s.js).await;
    support::exec(&s.pool, format!("DROP TABLE {effects}")).await;
}

/// A `MakeWriter` that keeps what the subscriber writes.
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

/// Scenario 5: A poison message: the same order id with another amount (the fingerprint differs, so
/// idem answers `Mismatch`). Dead-lettered at its first delivery, with a WARN line naming the
/// scope, the redacted key and the reason, and kept in the dead-letter stream.
#[test]
fn a_poison_message_is_dead_lettered_at_once_with_a_log_line() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // A current-thread runtime: every task of this test logs through this thread's subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = 987_000_000_000 + order_id() % 1_000_000_000;
    let finished = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let Some(s) = support::servers().await else {
                return false;
            };
            let Some(redis) = support::redis_store(&support::unique("idem_nats")).await else {
                return false;
            };
            let orders = support::orders(&s.js, ConsumerSettings::default()).await;
            let effects = support::effects_table(&s.pool).await;
            let glue = Glue::new(&orders.consumer);
            glue.ensure_dead_letter_stream(&s.js).await.unwrap();
            orders.publish(&s.js, &order(id, 500)).await;
            let poison = order(id, 900);
            orders.publish(&s.js, &poison).await;
            let none_fail = AtomicU32::new(0);
            let (mut tally, log) = consume(
                &orders,
                &glue,
                Duration::from_secs(30),
                |p| {
                    let (redis, pool, effects, f) = (&redis, &s.pool, &effects, &none_fail);
                    async move { crate::on_order_paid(redis, pool, &p, effects, f).await }
                },
                |t, _| t.deliveries == 2,
            )
            .await;
            tally.effects =
                support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await;
            assert_eq!(
                log[0].0,
                Settled::Acked {
                    outcome: Some(CallOutcome::Executed),
                    held: 0
                }
            );
            assert_eq!(
                log[1].0,
                Settled::DeadLettered {
                    reason: DeadLetterReason::Mismatch
                }
            );
            assert_eq!(log[1].1, 1, "dead-lettered at its first delivery");
            let dead = orders.dead_letters(&s.js).await;
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].0, "mismatch");
            assert_eq!(
                serde_json::from_slice::<OrderPaid>(&dead[0].1).unwrap(),
                poison
            );
            let state = orders.state().await;
            assert_eq!((state.num_pending, state.num_ack_pending), (0, 0));
            assert_eq!(tally.effects, 1);
            tally.print(
                "5. poison (same key, other payload)",
                "Redis (plain attribute)",
            );
            orders.delete(&s.js).await;
            support::exec(&s.pool, format!("DROP TABLE {effects}")).await;
            true
        })
    });
    if !finished {
        return;
    }
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("dead-lettered"))
        .unwrap_or_else(|| panic!("no dead-letter line in:\n{text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("scope=nats.tests.coupon"), "{line}");
    assert!(line.contains("key=redacted:"), "{line}");
    assert!(
        line.contains("reason=the key was already used with another payload"),
        "{line}"
    );
    assert!(
        !text.contains(&id.to_string()),
        "a key's text was logged:\n{text}"
    );
}

/// A handler slower than `ack_wait` (1 s) runs once: the glue's +WPI keeps JetStream from
/// redelivering it to the consumer's other puller meanwhile.
#[tokio::test]
async fn a_slow_handler_is_kept_alive_with_progress_and_runs_once() {
    let Some(s) = support::servers().await else {
        return;
    };
    let Some(redis) = support::redis_store(&support::unique("idem_nats")).await else {
        return;
    };
    let settings = ConsumerSettings {
        ack_wait: Duration::from_secs(1),
        ..Default::default()
    };
    let orders = support::orders(&s.js, settings).await;
    let effects = support::effects_table(&s.pool).await;
    let glue = Glue::new(&orders.consumer);
    assert_eq!(glue.ack_wait(), Duration::from_secs(1));
    orders.publish(&s.js, &order(order_id(), 500)).await;
    let none_fail = AtomicU32::new(0);
    let redelivered = std::sync::atomic::AtomicBool::new(false);
    let (mut tally, _) = consume(
        &orders,
        &glue,
        Duration::from_secs(30),
        |p| {
            let (redis, pool, effects, f) = (&redis, &s.pool, &effects, &none_fail);
            let (consumer, redelivered) = (&orders.consumer, &redelivered);
            async move {
                // The work takes 3.5 x ack_wait. Meanwhile a second puller on the same consumer
                // waits for the redelivery there would be without progress signals.
                let mut other = consumer
                    .stream()
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .unwrap();
                let work = tokio::time::sleep(Duration::from_millis(3500));
                tokio::select! {
                    () = work => {}
                    m = other.next() => {
                        redelivered.store(true, std::sync::atomic::Ordering::SeqCst);
                        panic!("redelivered while the handler ran: {m:?}");
                    }
                }
                crate::on_order_paid(redis, pool, &p, effects, f).await
            }
        },
        |t, _| t.acks == 1,
    )
    .await;
    tally.effects = support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await;
    assert!(!redelivered.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(tally.redeliveries, 0);
    let state = orders.state().await;
    assert_eq!((state.num_redelivered, state.num_ack_pending), (0, 0));
    assert_eq!(tally.effects, 1);
    tally.print("slow handler (3.5 x ack_wait)", "Redis (plain attribute)");
    orders.delete(&s.js).await;
    support::exec(&s.pool, format!("DROP TABLE {effects}")).await;
}
