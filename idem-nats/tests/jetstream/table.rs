//! Scenario 7: Every row of the ack decision table (`idem_runtime::ack`), once, against the broker: the
//! call's outcome, the glue's decision, and what JetStream then shows.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, Message};
use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::ack::{DeadLetterReason, Policy};
use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{CallOutcome, PgStore, RedisStore, idempotent};

use crate::support::{self, ConsumerSettings, OrderPaid, Orders};
use crate::{AppError, issue_coupon_tx};

/// A handler that panics.
#[idempotent(key = "id", store = "store", scope = "nats.tests.panics")]
async fn panics(store: &RedisStore, id: i64) -> Result<i64, AppError> {
    if id > 0 {
        panic!("the handler panicked on purpose");
    }
    Ok(id)
}

/// A handler keyed by a code, which may be empty (an invalid key).
#[idempotent(key = "code", store = "store", scope = "nats.tests.by_code")]
async fn by_code(store: &RedisStore, code: &str) -> Result<usize, AppError> {
    Ok(code.len())
}

/// A handler with no store: this binary installs no default store.
#[idempotent(key = "id", scope = "nats.tests.no_store")]
async fn no_store(id: i64) -> Result<i64, AppError> {
    Ok(id)
}

/// A handler whose output is over its `max_output`: done, but not replayable.
#[idempotent(
    key = "id",
    store = "store",
    scope = "nats.tests.big",
    max_output = "16B"
)]
async fn big(store: &RedisStore, id: i64) -> Result<String, AppError> {
    Ok(format!("{id:>64}"))
}

/// The transactional handler that, on its first run, hands its own claim to another token as a
/// holder that took over would have: its mark fails (the lease was lost), its writes are undone.
#[idempotent(
    key = "order.id",
    tx = "tx",
    store = "store",
    scope = "nats.tests.stolen",
    ttl = "10s"
)]
async fn stolen_once(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    order: &OrderPaid,
    effects: &str,
    steal: &AtomicU32,
) -> Result<i64, AppError> {
    sqlx::query(AssertSqlSafe(crate::insert_effect(effects)))
        .bind(order.id)
        .bind(0_i64)
        .execute(&mut **tx)
        .await?;
    if steal.fetch_add(1, Ordering::SeqCst) == 0 {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET token = $1 WHERE scope = $2",
            store.table()
        )))
        .bind(vec![0u8; 16])
        .bind("nats.tests.stolen")
        .execute(&mut **tx)
        .await?;
    }
    Ok(order.id)
}

struct Table<'a> {
    orders: &'a Orders,
    js: &'a jetstream::Context,
    messages: jetstream::consumer::pull::Stream,
    glue: Glue,
    rows: Vec<String>,
    held: u64,
    next_id: i64,
}

impl Table<'_> {
    fn order(&mut self) -> OrderPaid {
        self.next_id += 1;
        OrderPaid {
            id: self.next_id,
            user: 1,
            amount: 100,
        }
    }

    async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(20), self.messages.next())
            .await
            .expect("a delivery within 20 s")
            .unwrap()
            .unwrap()
    }

    /// Settle the next delivery with `call`; record the row.
    async fn settle<F, Fut, T>(&mut self, row: &str, call: F) -> (Settled, u32)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, AppError>>,
    {
        let msg = self.next().await;
        let delivered = support::delivered(&msg);
        let settled = self.glue.settle(msg, call).await.unwrap();
        if let Settled::Acked { held, .. } = settled {
            self.held += u64::from(held);
        }
        self.rows
            .push(format!("{row:<58} delivery {delivered}: {settled:?}"));
        (settled, delivered)
    }

    async fn assert_settled_all(&self) {
        let state = self.orders.state().await;
        assert_eq!(
            (state.num_pending, state.num_ack_pending),
            (0, 0),
            "{:?}",
            self.rows
        );
    }
}

#[tokio::test]
async fn each_row_of_the_decision_table_against_the_broker() {
    let Some(s) = support::servers().await else {
        return;
    };
    let Some(redis) = support::redis_store(&support::unique("idem_nats")).await else {
        return;
    };
    let settings = ConsumerSettings {
        ack_wait: Duration::from_secs(1),
        max_deliver: 3,
        ..Default::default()
    };
    let orders = support::orders(&s.js, settings).await;
    let store = support::pg_store(&s.pool).await;
    let effects = support::effects_table(&s.pool).await;
    let policy = Policy::default().backoff(Duration::from_millis(100), Duration::from_secs(1));
    let glue = Glue::new(&orders.consumer).policy(policy);
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    let messages = orders
        .consumer
        .stream()
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut b = Table {
        orders: &orders,
        js: &s.js,
        messages,
        glue,
        rows: Vec::new(),
        held: 0,
        next_id: 1_000,
    };
    let pool = &s.pool;
    let no_fail = AtomicU32::new(0);
    let (store, effects, redis) = (&store, effects.as_str(), &redis);

    // Executed + Ok, then Replayed + Ok: +ACK.
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    b.orders.publish(b.js, &o).await;
    for want in [CallOutcome::Executed, CallOutcome::Replayed] {
        let (settled, _) = b
            .settle("done / replayed, Ok", || {
                crate::issue_coupon(redis, pool, &o, effects, &no_fail)
            })
            .await;
        assert_eq!(
            settled,
            Settled::Acked {
                outcome: Some(want),
                held: 0
            }
        );
    }
    b.assert_settled_all().await;

    // Executed, then the caller's commit fails: not acked, -NAK as a failure; its redelivery runs.
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    for commit in [false, true] {
        let (settled, _) = b
            .settle("executed, then the caller's commit failed", || async {
                let mut tx = store.pool().begin().await?;
                issue_coupon_tx(store, &mut tx, &o, effects, 1).await?;
                if !commit {
                    tx.rollback().await?;
                    return Err(AppError::Failed);
                }
                tx.commit().await?;
                Ok(())
            })
            .await;
        let want = if commit {
            Settled::Acked {
                outcome: Some(CallOutcome::Executed),
                held: 0,
            }
        } else {
            Settled::Redelivering {
                after: Duration::from_millis(100),
                attempt: 1,
            }
        };
        assert_eq!(settled, want);
    }

    // In flight elsewhere: held in-process past ack_wait (1 s) without a delivery spent, then
    // acked as a replay once the holder commits.
    let o = b.order();
    let mut holder = store.pool().begin().await.unwrap();
    issue_coupon_tx(store, &mut holder, &o, effects, 2)
        .await
        .unwrap();
    b.orders.publish(b.js, &o).await;
    let calls = AtomicU32::new(0);
    let holder = tokio::sync::Mutex::new(Some(holder));
    let (settled, delivered) = b
        .settle("in flight elsewhere", || async {
            // The fifth try comes 1.5 s after the first (holds of 0.1, 0.2, 0.4 and 0.8 s): past
            // ack_wait. Then the holder commits.
            if calls.fetch_add(1, Ordering::SeqCst) == 4 {
                holder.lock().await.take().unwrap().commit().await?;
            }
            let mut tx = store.pool().begin().await?;
            issue_coupon_tx(store, &mut tx, &o, effects, 3).await?;
            tx.commit().await?;
            Ok(())
        })
        .await;
    assert_eq!(
        (settled, delivered),
        (
            Settled::Acked {
                outcome: Some(CallOutcome::Replayed),
                held: 4
            },
            1
        )
    );
    assert_eq!(
        b.orders.state().await.num_redelivered,
        0,
        "the hold cost a delivery"
    );

    // The store does not answer: held, tried again, run once it is back.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let down = idem_runtime::redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let down = RedisStore::builder_from_client(down)
        .unwrap()
        .prefix(support::unique("idem_nats"))
        .build();
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    let calls = AtomicU32::new(0);
    let server = std::sync::Mutex::new(None);
    let (settled, _) = b
        .settle("store unavailable", || {
            if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                // Held once: now bring the store up.
                let child = std::process::Command::new("redis-server")
                    .args([
                        "--port",
                        &port.to_string(),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-server");
                *server.lock().unwrap() = Some(child);
            }
            crate::issue_coupon(&down, pool, &o, effects, &no_fail)
        })
        .await;
    if let Some(mut child) = server.lock().unwrap().take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        matches!(settled, Settled::Acked { outcome: Some(CallOutcome::Executed), held } if held >= 1),
        "{settled:?}"
    );

    // The mark could not be written (the lease was lost): held, run again, acked.
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    let steal = AtomicU32::new(0);
    let (settled, _) = b
        .settle("lease lost before the mark (unsettled)", || async {
            let mut tx = store.pool().begin().await?;
            stolen_once(store, &mut tx, &o, effects, &steal).await?;
            tx.commit().await?;
            Ok(())
        })
        .await;
    assert_eq!(
        settled,
        Settled::Acked {
            outcome: Some(CallOutcome::Executed),
            held: 1
        }
    );
    let rows = support::count(
        pool,
        format!("SELECT count(*) FROM {effects} WHERE order_id = {}", o.id),
    )
    .await;
    assert_eq!(rows, 1, "the run that lost its lease was rolled back");

    // The handler fails, then panics: -NAK with back-off each time; then it succeeds.
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    let fail_once = AtomicU32::new(1);
    let (settled, _) = b
        .settle("handler Err", || {
            crate::issue_coupon(redis, pool, &o, effects, &fail_once)
        })
        .await;
    assert_eq!(
        settled,
        Settled::Redelivering {
            after: Duration::from_millis(100),
            attempt: 1
        }
    );
    let (settled, delivered) = b.settle("handler panicked", || panics(redis, o.id)).await;
    assert_eq!(
        (settled, delivered),
        (
            Settled::Redelivering {
                after: Duration::from_millis(200),
                attempt: 2
            },
            2
        )
    );
    let (settled, _) = b
        .settle("handler Ok at last", || {
            crate::issue_coupon(redis, pool, &o, effects, &no_fail)
        })
        .await;
    assert_eq!(
        settled,
        Settled::Acked {
            outcome: Some(CallOutcome::Executed),
            held: 0
        }
    );
    b.assert_settled_all().await;

    // An error before any idempotent call (the body does not parse): a failure each delivery;
    // on the last delivery JetStream allows (max_deliver 3, below max_attempts 5) it is
    // dead-lettered rather than -NAKed into silence.
    b.orders.publish_raw(b.js, b"not an order").await;
    for attempt in 1..=3u32 {
        let (settled, _) = b
            .settle(
                "no idempotent call, Err (the body does not parse)",
                || async {
                    let order: OrderPaid = serde_json::from_slice(b"not an order")?;
                    Ok(order.id)
                },
            )
            .await;
        let want = if attempt < 3 {
            Settled::Redelivering {
                after: Duration::from_millis(100) * (1 << (attempt - 1)),
                attempt,
            }
        } else {
            Settled::DeadLettered {
                reason: DeadLetterReason::HandlerFailed { attempts: 3 },
            }
        };
        assert_eq!(settled, want);
    }

    // No idempotent call, Ok: +ACK.
    b.orders.publish_raw(b.js, b"{}").await;
    let (settled, _) = b
        .settle("no idempotent call, Ok", || async { Ok(()) })
        .await;
    assert_eq!(
        settled,
        Settled::Acked {
            outcome: None,
            held: 0
        }
    );

    // Done, but the output was not stored: +ACK (the effect happened once), the consumer
    // treating Unreplayable as done and returning Ok, as the README's table says (an Err after
    // it is retried as a failure).
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    b.orders.publish(b.js, &o).await;
    for want in [CallOutcome::Executed, CallOutcome::Unreplayable] {
        let (settled, _) = b
            .settle("done, output over max_output", || async {
                match big(redis, o.id).await {
                    Err(AppError::Idem(idem_runtime::Error::Unreplayable { .. })) => Ok(()),
                    other => other.map(drop),
                }
            })
            .await;
        assert_eq!(
            settled,
            Settled::Acked {
                outcome: Some(want),
                held: 0
            }
        );
    }

    // Dead-lettered at once: Mismatch, Corrupt, an invalid key, no store.
    let o = b.order();
    b.orders.publish(b.js, &o).await;
    b.settle("(first run of the order below)", || {
        crate::issue_coupon(redis, pool, &o, effects, &no_fail)
    })
    .await;
    let poison = OrderPaid {
        amount: 999,
        ..o.clone()
    };
    b.orders.publish(b.js, &poison).await;
    let (settled, _) = b
        .settle("same key, other payload", || {
            crate::issue_coupon(redis, pool, &poison, effects, &no_fail)
        })
        .await;
    assert_eq!(
        settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::Mismatch
        }
    );

    let o = b.order();
    b.orders.publish(b.js, &o).await;
    b.orders.publish(b.js, &o).await;
    let tx_call = || async {
        let mut tx = store.pool().begin().await?;
        issue_coupon_tx(store, &mut tx, &o, effects, 4).await?;
        tx.commit().await?;
        Ok(())
    };
    b.settle("(first run of the order below)", tx_call).await;
    support::exec(
        pool,
        format!(
            "UPDATE {} SET output = '\\xc1'::bytea WHERE state = 2",
            store.table()
        ),
    )
    .await;
    let (settled, _) = b.settle("stored record does not decode", tx_call).await;
    assert_eq!(
        settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::Corrupt
        }
    );

    b.orders.publish_raw(b.js, b"{}").await;
    let (settled, _) = b.settle("empty key", || by_code(redis, "")).await;
    assert_eq!(
        settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::InvalidKey
        }
    );

    b.orders.publish_raw(b.js, b"{}").await;
    let (settled, _) = b.settle("no store installed", || no_store(7)).await;
    assert_eq!(
        settled,
        Settled::DeadLettered {
            reason: DeadLetterReason::Misconfigured
        }
    );

    b.assert_settled_all().await;
    let dead: Vec<String> = orders
        .dead_letters(&s.js)
        .await
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(
        dead,
        [
            "handler_failed",
            "mismatch",
            "corrupt",
            "invalid_key",
            "misconfigured"
        ]
    );
    println!(
        "the decision table against JetStream:\n{}",
        b.rows.join("\n")
    );
    let mut tally = support::Tally {
        deliveries: b.rows.len() as u64,
        ..Default::default()
    };
    tally.dead_letters = dead.len() as u64;
    tally.effects = support::count(pool, format!("SELECT count(*) FROM {effects}")).await;
    tally.acks = b.rows.iter().filter(|r| r.contains("Acked")).count() as u64;
    tally.redeliveries = b.rows.iter().filter(|r| !r.contains("delivery 1:")).count() as u64;
    tally.held = b.held;
    tally.print("7. the decision table, row by row", "Redis + PostgreSQL");
    drop(b);
    orders.delete(&s.js).await;
    support::drop_pg_store(pool, store).await;
    support::exec(pool, format!("DROP TABLE {effects}")).await;
}
