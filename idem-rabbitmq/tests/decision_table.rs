//! Each row of the ack decision table (`idem_runtime::ack`) carried out against RabbitMQ once:
//! what `settle` returns, and what the broker holds afterwards (the copy back in the queue with
//! its counters, or in the dead-letter queue). The store is in memory where the row does not
//! depend on it; no default store is installed in this binary (the `NoStore` row needs that).
mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use idem_rabbitmq::{Glue, QueueKind, Settled, headers};
use idem_runtime::ack::{DeadLetterReason, Policy, RetryReason};
use idem_runtime::{CallOutcome, MemoryStore, RedisStore, idempotent};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};

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

#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.tests.row")]
async fn handler(store: &MemoryStore, key: &str, fail: bool) -> Result<u64, AppError> {
    if fail {
        return Err(AppError::Failed);
    }
    Ok(7)
}

#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.tests.row_redis")]
async fn on_redis(store: &RedisStore, key: &str) -> Result<u64, AppError> {
    Ok(1)
}

#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.tests.row_held")]
async fn held(
    store: &MemoryStore,
    key: &str,
    gate: Arc<tokio::sync::Notify>,
) -> Result<u64, AppError> {
    gate.notified().await;
    Ok(2)
}

#[idempotent(key = "key", scope = "idem_rabbitmq.tests.row_no_store")]
async fn no_store(key: &str) -> Result<u64, AppError> {
    Ok(3)
}

#[idempotent(
    key = "key",
    store = "store",
    scope = "idem_rabbitmq.tests.row_big",
    max_output = "1KiB"
)]
async fn big_output(store: &MemoryStore, key: &str) -> Result<String, AppError> {
    Ok("x".repeat(4096))
}

struct Q {
    channel: Channel,
    glue: Glue,
    consumer: Consumer,
    queue: String,
}

/// A fresh quorum queue with one message on it, and a consumer.
async fn queue_with_one(conn: &lapin::Connection, policy: Policy) -> Q {
    let queue = unique("idem_rmq_row");
    let (channel, glue) = fresh_queue(conn, &queue, QueueKind::Quorum, policy).await;
    publish(&channel, &queue, "m-1", b"{}").await;
    channel
        .basic_qos(4, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    Q {
        channel,
        glue,
        consumer,
        queue,
    }
}

impl Q {
    async fn next(&mut self) -> Delivery {
        tokio::time::timeout(Duration::from_secs(20), self.consumer.next())
            .await
            .expect("a delivery within 20 s")
            .unwrap()
            .unwrap()
    }

    /// Nothing is left: the queue, its delay queues and its dead-letter queue are empty.
    async fn assert_empty(&self, conn: &lapin::Connection) {
        assert_eq!(ready(conn, &self.queue).await, 0);
        assert_eq!(delayed(conn, &self.queue).await, 0);
        let dlq = self.glue.topology().dead_letter_queue();
        assert_eq!(ready(conn, dlq).await, 0);
    }

    async fn clean(self) {
        delete_all(&self.channel, &self.queue).await;
    }
}

fn policy() -> Policy {
    Policy::default()
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .in_flight(Duration::from_millis(50), Duration::from_millis(200))
}

/// Row 1: executed, or replayed, and the future returned `Ok`: acked.
#[tokio::test]
async fn row_executed_or_replayed_and_ok_is_acked() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy()).await;
    publish(&q.channel, &q.queue, "m-2", b"{}").await;
    let key = unique("k");
    let first = q.next().await;
    let s = q
        .glue
        .settle(&first, handler(&store, &key, false))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Executed)
        }
    );
    let second = q.next().await;
    let s = q
        .glue
        .settle(&second, handler(&store, &key, false))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Replayed)
        }
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 2: the call was done but the future failed after it (its commit): not acked, retried as
/// a failure; the copy carries `x-idem-failures = 1`.
#[tokio::test]
async fn row_done_but_failed_after_the_call_is_retried_as_a_failure() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy()).await;
    let key = unique("k");
    let d = q.next().await;
    let s = q
        .glue
        .settle(&d, async {
            handler(&store, &key, false).await?;
            Err::<(), _>(AppError::After)
        })
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Redelivered {
            after: Duration::from_millis(50),
            reason: RetryReason::HandlerFailed { attempt: 1 }
        }
    );
    let back = q.next().await;
    assert_eq!(header_int(&back, headers::FAILURES), Some(1));
    let s = q
        .glue
        .settle(&back, handler(&store, &key, false))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Replayed)
        }
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 3: in flight elsewhere: redelivered after the policy's pause through the delay queue,
/// as a deferral (not a failure), and the quorum queue's delivery count is untouched.
#[tokio::test]
async fn row_in_flight_is_deferred_without_burning_the_delivery_limit() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy()).await;
    let key = unique("k");
    let gate = Arc::new(tokio::sync::Notify::new());
    let holder = {
        let (store, key, gate) = (store.clone(), key.clone(), gate.clone());
        tokio::spawn(async move { held(&store, &key, gate).await })
    };
    // The holder has the key once a duplicate is refused; until then, give it its turn.
    while store.is_empty() {
        tokio::task::yield_now().await;
    }
    let mut d = q.next().await;
    for deferral in 1..=3 {
        let s = q
            .glue
            .settle(&d, held(&store, &key, gate.clone()))
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
        d = q.next().await;
        assert_eq!(header_int(&d, headers::DEFERRALS), Some(deferral));
        assert_eq!(header_int(&d, headers::FAILURES), Some(0));
        assert!(
            header_int(&d, "x-delivery-count").unwrap_or(0) == 0,
            "limit burnt"
        );
    }
    gate.notify_one();
    holder.await.unwrap().unwrap();
    let s = q
        .glue
        .settle(&d, held(&store, &key, gate.clone()))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Replayed)
        }
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 4: the store did not answer (the handler did not run): retried later, not a failure.
#[tokio::test]
async fn row_store_unavailable_is_retried_later() {
    let Some(conn) = rabbit().await else { return };
    // Nothing listens on port 1: every claim fails (the store connects lazily).
    let down = RedisStore::from_url("redis://127.0.0.1:1").await.unwrap();
    let mut q = queue_with_one(&conn, policy()).await;
    let key = unique("k");
    let d = q.next().await;
    let s = q.glue.settle(&d, on_redis(&down, &key)).await.unwrap();
    assert!(
        matches!(
            s,
            Settled::Redelivered {
                reason: RetryReason::StoreUnavailable,
                ..
            }
        ),
        "{s:?}"
    );
    let back = q.next().await;
    assert_eq!(header_int(&back, headers::DEFERRALS), Some(1));
    assert_eq!(header_int(&back, headers::FAILURES), Some(0));
    let store = MemoryStore::new();
    let s = q
        .glue
        .settle(&back, handler(&store, &key, false))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Executed)
        }
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 5: the handler failed: retried while attempts remain, then dead-lettered; a panic counts
/// as a failure too (and goes on to the caller after the delivery is settled).
#[tokio::test]
async fn row_handler_failure_is_retried_then_dead_lettered_and_a_panic_counts() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy().max_attempts(2)).await;
    let key = unique("k");
    let d = q.next().await;
    let glue = q.glue.clone();
    let panicked = tokio::spawn(async move {
        glue.settle(&d, async {
            panic!("handler panicked (on purpose)") as Result<(), AppError>
        })
        .await
    })
    .await;
    assert!(panicked.unwrap_err().is_panic(), "the panic goes on");
    let back = q.next().await;
    assert_eq!(header_int(&back, headers::FAILURES), Some(1));
    let s = q
        .glue
        .settle(&back, handler(&store, &key, true))
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 2 }
        }
    );
    let dead = drain(&q.channel, q.glue.topology().dead_letter_queue()).await;
    assert_eq!(dead.len(), 1);
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 6: a message no redelivery can fix is dead-lettered at once: an invalid (empty) key, and
/// no store installed (misconfigured). (`Mismatch` is the poison scenario in scenarios.rs.)
#[tokio::test]
async fn row_invalid_key_or_no_store_is_dead_lettered_at_once() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy()).await;
    publish(&q.channel, &q.queue, "m-2", b"{}").await;
    let d = q.next().await;
    let s = q.glue.settle(&d, handler(&store, "", false)).await.unwrap();
    assert_eq!(
        s,
        Settled::DeadLettered {
            reason: DeadLetterReason::InvalidKey
        }
    );
    let d = q.next().await;
    let s = q.glue.settle(&d, no_store(&unique("k"))).await.unwrap();
    assert_eq!(
        s,
        Settled::DeadLettered {
            reason: DeadLetterReason::Misconfigured
        }
    );
    let dead = drain(&q.channel, q.glue.topology().dead_letter_queue()).await;
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| header_text(d, headers::REASON))
        .collect();
    assert_eq!(
        reasons,
        [Some("invalid_key".into()), Some("misconfigured".into())]
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}

/// Row 7: done, but its output was not stored: acked by default (the effect happened once), or
/// dead-lettered when the policy says so.
#[tokio::test]
async fn row_unreplayable_is_acked_or_dead_lettered_by_policy() {
    let Some(conn) = rabbit().await else { return };
    let store = MemoryStore::new();
    let mut q = queue_with_one(&conn, policy()).await;
    publish(&q.channel, &q.queue, "m-2", b"{}").await;
    let key = unique("k");
    let d = q.next().await;
    let s = q.glue.settle(&d, big_output(&store, &key)).await.unwrap();
    assert!(matches!(s, Settled::Acked { .. }), "{s:?}");
    let d = q.next().await;
    // The consumer treats Unreplayable as done and returns Ok (the README's table): acked. An
    // Err after it is retried as a failure (tests/review.rs).
    let s = q
        .glue
        .settle(&d, async {
            match big_output(&store, &key).await {
                Err(AppError::Idem(idem_runtime::Error::Unreplayable { .. })) => Ok(()),
                other => other.map(drop),
            }
        })
        .await
        .unwrap();
    assert_eq!(
        s,
        Settled::Acked {
            outcome: Some(CallOutcome::Unreplayable)
        }
    );
    q.assert_empty(&conn).await;
    let strict = Glue::builder(&q.queue)
        .policy(policy().dead_letter_unreplayable(true))
        .build(&conn)
        .await
        .unwrap();
    publish(&q.channel, &q.queue, "m-3", b"{}").await;
    let d = q.next().await;
    let s = strict.settle(&d, big_output(&store, &key)).await.unwrap();
    assert_eq!(
        s,
        Settled::DeadLettered {
            reason: DeadLetterReason::Unreplayable
        }
    );
    assert_eq!(
        drain(&q.channel, strict.topology().dead_letter_queue())
            .await
            .len(),
        1
    );
    q.assert_empty(&conn).await;
    q.clean().await;
}
