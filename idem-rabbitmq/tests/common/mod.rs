//! The handlers the scenario tests consume with: the transactional attribute on PostgreSQL (the
//! exactly-once scenarios) and the plain attribute on Redis. Each effect is one row of a table
//! without a unique key: only idem stands between a duplicate and a second row.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool, Postgres, Transaction};
use idem_runtime::{PgStore, RedisStore, idempotent};

/// The body a producer publishes: the business key is `order_id`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Order {
    pub order_id: i64,
    #[serde(default)]
    pub amount: i64,
    /// How long the handler takes after its effect.
    #[serde(default)]
    pub pause_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Body(#[from] serde_json::Error),
    #[error("the handler failed (on purpose)")]
    Failed,
}

pub async fn create_effects(pool: &PgPool, effects: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {effects} (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, worker BIGINT NOT NULL)"
    )))
    .execute(pool)
    .await
    .unwrap();
}

pub async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .unwrap();
}

/// Effect rows per order.
pub async fn effects_per_order(pool: &PgPool, effects: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT order_id, count(*) FROM {effects} GROUP BY order_id ORDER BY order_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

pub async fn effect_count(pool: &PgPool, effects: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {effects}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A PostgreSQL store on a table of its own.
pub async fn pg_store(pool: &PgPool, table: &str) -> PgStore {
    let store = PgStore::with_table(pool.clone(), table).unwrap();
    store.migrate().await.unwrap();
    store
}

pub async fn drop_store(pool: &PgPool, table: &str) {
    drop_table(pool, table).await;
    drop_table(pool, &format!("{table}_migrations")).await;
}

/// The exactly-once handler: the coupon row and the done mark commit in the caller's transaction.
#[idempotent(
    key = "{run}:{order_id}",
    tx = "tx",
    store = "store",
    scope = "idem_rabbitmq.tests.coupon_tx",
    ttl = "2s"
)]
pub async fn coupon_tx(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    run: &str,
    order_id: i64,
    effects: &str,
    worker: i64,
    pause_ms: u64,
) -> Result<i64, AppError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {effects} (order_id, worker) VALUES ($1, $2)"
    )))
    .bind(order_id)
    .bind(worker)
    .execute(&mut **tx)
    .await?;
    // Widens the window in which a duplicate or a kill lands mid-transaction.
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    Ok(order_id)
}

/// What the consumer runs for one delivery with the transactional attribute: decode, begin, call,
/// commit. `Ok` only after the commit, so the glue acks only then.
pub async fn handle_tx(
    pool: &PgPool,
    store: &PgStore,
    run: &str,
    effects: &str,
    worker: i64,
    body: &[u8],
) -> Result<i64, AppError> {
    let order: Order = serde_json::from_slice(body)?;
    let mut tx = pool.begin().await?;
    let coupon = coupon_tx(
        store,
        &mut tx,
        run,
        order.order_id,
        effects,
        worker,
        order.pause_ms,
    )
    .await?;
    tx.commit().await?;
    Ok(coupon)
}

/// The plain attribute on Redis; the same key with another `amount` is a `Mismatch`.
#[idempotent(
    key = "{run}:{order_id}",
    store = "store",
    scope = "idem_rabbitmq.tests.coupon_redis",
    ttl = "5s",
    fingerprint = "amount"
)]
#[allow(clippy::too_many_arguments)]
pub async fn coupon_redis(
    store: &RedisStore,
    pool: &PgPool,
    run: &str,
    order_id: i64,
    amount: i64,
    effects: &str,
    fail: bool,
) -> Result<i64, AppError> {
    if fail {
        return Err(AppError::Failed);
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {effects} (order_id, worker) VALUES ($1, 0)"
    )))
    .bind(order_id)
    .execute(pool)
    .await?;
    Ok(order_id + amount)
}
