#![allow(missing_docs, unreachable_pub)]

//! The glue against a real NATS JetStream (NATS_URL, default 127.0.0.1:4222), real stores
//! (PostgreSQL: POSTGRES_URL; Redis: REDIS_URL) and a PostgreSQL table of effects: the source
//! articles' scenarios, one test each, and every row of the ack decision table. Each test prints
//! its row of the scenario table (`SCENARIO|...`; run with `--nocapture` to see them).
//!
//! The multi-process tests re-run this binary as worker processes (`--exact worker_process`,
//! with `IDEM_NATS_WORKER` set); in a normal run `worker_process` returns at once.

mod processes;
mod review;
mod review2;
mod scenarios;
mod support;
mod table;

use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool, Postgres, Transaction};
use idem_runtime::{PgStore, RedisStore, idempotent};
use support::OrderPaid;

/// The consumer's errors: idem's, the database's, a body that does not parse, and the
/// handler's own failure.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the body is not an order: {0}")]
    Body(#[from] serde_json::Error),
    #[error("the handler failed")]
    Failed,
}

fn insert_effect(effects: &str) -> String {
    format!("INSERT INTO {effects} (order_id, worker) VALUES ($1, $2)")
}

/// The transactional handler: the effect row and the done mark commit together. Its output is
/// the worker that ran it (a replay answers the first one's).
#[idempotent(
    key = "order.id",
    tx = "tx",
    store = "store",
    scope = "nats.tests.coupon_tx",
    ttl = "10s"
)]
pub async fn issue_coupon_tx(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    order: &OrderPaid,
    effects: &str,
    worker: i64,
) -> Result<i64, AppError> {
    sqlx::query(AssertSqlSafe(insert_effect(effects)))
        .bind(order.id)
        .bind(worker)
        .execute(&mut **tx)
        .await?;
    Ok(worker)
}

/// What the consumer does with one message, transactional form: parse the body (the business
/// key is in it), begin, call the handler, commit; `Ok` only after the commit.
pub async fn on_order_paid_tx(
    store: &PgStore,
    payload: &[u8],
    effects: &str,
    worker: i64,
) -> Result<i64, AppError> {
    let order: OrderPaid = serde_json::from_slice(payload)?;
    let mut tx = store.pool().begin().await?;
    let coupon = issue_coupon_tx(store, &mut tx, &order, effects, worker).await?;
    tx.commit().await?;
    Ok(coupon)
}

/// The plain handler on Redis: the effect row is written outside any transaction. It fails
/// while `failures_left` is above zero (before its effect), and the amount is fingerprinted
/// (the same order id with another amount is a `Mismatch`).
#[idempotent(
    key = "order.id",
    store = "store",
    scope = "nats.tests.coupon",
    fingerprint = "order.amount",
    ttl = "10s"
)]
pub async fn issue_coupon(
    store: &RedisStore,
    pool: &PgPool,
    order: &OrderPaid,
    effects: &str,
    failures_left: &AtomicU32,
) -> Result<i64, AppError> {
    if failures_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return Err(AppError::Failed);
    }
    sqlx::query(AssertSqlSafe(insert_effect(effects)))
        .bind(order.id)
        .bind(0_i64)
        .execute(pool)
        .await?;
    Ok(order.id * 10)
}

/// The plain form's consumer future: parse the body, call the handler.
pub async fn on_order_paid(
    store: &RedisStore,
    pool: &PgPool,
    payload: &[u8],
    effects: &str,
    failures_left: &AtomicU32,
) -> Result<i64, AppError> {
    let order: OrderPaid = serde_json::from_slice(payload)?;
    issue_coupon(store, pool, &order, effects, failures_left).await
}

/// The entry point of the worker processes (see `processes`); a no-op in a normal run.
#[test]
fn worker_process() {
    if let Some((role, args)) = support::worker_role() {
        processes::run_worker(&role, &args);
    }
}
