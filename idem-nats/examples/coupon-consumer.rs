//! Before and after: a JetStream pull consumer that issues a coupon per "order paid" message,
//! first as it is usually written (ack after the work), then with idem (one attribute on the
//! handler, `glue.settle` instead of `message.ack()`). The same stream, with the articles'
//! duplicates (a producer retry with a new message id, duplicates racing the first), goes
//! through both; the coupons table has no unique key.
//!
//! ```sh
//! cargo run -p idem-nats --example coupon-consumer   # NATS on NATS_URL, PostgreSQL on POSTGRES_URL
//! ```

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::StreamExt as _;
use idem_runtime::sqlx::{self, PgPool, Postgres, Transaction};
use idem_runtime::{PgStore, idempotent};
use serde::{Deserialize, Serialize};

/// The message: the business key, `order_id`, is in the body.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPaid {
    order_id: i64,
    user: i64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the body is not an order: {0}")]
    Body(#[from] serde_json::Error),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---- Before: the handler and the loop without idem ----

async fn issue_coupon_unprotected(pool: &PgPool, order: &OrderPaid) -> Result<(), AppError> {
    sqlx::query("INSERT INTO demo_coupons_before (order_id, user_id) VALUES ($1, $2)")
        .bind(order.order_id)
        .bind(order.user)
        .execute(pool)
        .await?;
    Ok(())
}

async fn consume_without_idem(consumer: &PullConsumer, pool: &PgPool) -> Result<(), BoxError> {
    let mut messages = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let order: OrderPaid = serde_json::from_slice(&message.payload)?;
        issue_coupon_unprotected(pool, &order).await?;
        message.ack().await?;
    }
    Ok(())
}

// ---- After: the same handler with the attribute, the same loop with the glue ----

/// The coupon and idem's done mark are written in the caller's transaction: they commit
/// together, so even a consumer killed between the commit and the ack issues one coupon.
#[idempotent(
    key = "order.order_id",
    tx = "tx",
    store = "store",
    scope = "demo.issue_coupon"
)]
async fn issue_coupon(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    order: &OrderPaid,
) -> Result<(), AppError> {
    sqlx::query("INSERT INTO demo_coupons_after (order_id, user_id) VALUES ($1, $2)")
        .bind(order.order_id)
        .bind(order.user)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What the consumer does with one message: parse, begin, call, commit. `Ok` only after the
/// commit, so the glue acks only what committed. A body that does not parse is an `Err` too:
/// retried, then dead-lettered, never lost.
async fn on_order_paid(store: &PgStore, body: &[u8]) -> Result<(), AppError> {
    let order: OrderPaid = serde_json::from_slice(body)?;
    let mut tx = store.pool().begin().await?;
    issue_coupon(store, &mut tx, &order).await?;
    tx.commit().await?;
    Ok(())
}

async fn consume_with_idem(
    consumer: &PullConsumer,
    store: &PgStore,
    glue: &idem_nats::Glue,
) -> Result<(), BoxError> {
    let mut messages = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let body = message.payload.clone();
        glue.settle(message, || on_order_paid(store, &body)).await?; // instead of message.ack()
    }
    Ok(())
}

// ---- The demo around them ----

/// The stream the producer writes: (order, copies, what happened).
const ORDERS: &[(i64, usize, &str)] = &[
    (1001, 1, "delivered once"),
    (1002, 2, "producer retry: re-sent with a new message id"),
    (1003, 2, "upstream payment retry"),
    (1004, 4, "3 duplicates right behind the first"),
    (1005, 1, "delivered once"),
    (1006, 3, "producer retry, twice"),
];

async fn new_consumer(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
) -> Result<PullConsumer, BoxError> {
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            ..Default::default()
        })
        .await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("coupons".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    for &(order_id, copies, _) in ORDERS {
        for copy in 0..copies {
            let body = serde_json::to_vec(&OrderPaid { order_id, user: 7 })?;
            let mut headers = async_nats::HeaderMap::new();
            // Each copy a message of its own, as a producer's retry is: JetStream's duplicate
            // window (Nats-Msg-Id) cannot tell them apart; the business key can.
            headers.insert("Nats-Msg-Id", format!("{name}-{order_id}-{copy}").as_str());
            js.publish_with_headers(subject.to_owned(), headers, body.into())
                .await?
                .await?;
        }
    }
    Ok(consumer)
}

async fn coupons(pool: &PgPool, table: &str, order_id: i64) -> Result<i64, BoxError> {
    let sql = format!("SELECT count(*) FROM {table} WHERE order_id = $1");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(order_id)
        .fetch_one(pool)
        .await?)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let pg_url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let js = jetstream::new(async_nats::connect(&nats_url).await?);
    let pool = PgPool::connect(&pg_url).await?;
    for table in ["demo_coupons_before", "demo_coupons_after"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, user_id BIGINT NOT NULL)"
        )))
        .execute(&pool)
        .await?;
    }
    let store = PgStore::with_table(pool.clone(), "demo_idem")?;
    store.migrate().await?;
    sqlx::query("DELETE FROM demo_idem WHERE scope = 'demo.issue_coupon'")
        .execute(&pool)
        .await?;

    let before = new_consumer(&js, "DEMO_BEFORE", "demo.before.orders").await?;
    consume_without_idem(&before, &pool).await?;

    let after = new_consumer(&js, "DEMO_AFTER", "demo.after.orders").await?;
    let glue = idem_nats::Glue::new(&after);
    glue.ensure_dead_letter_stream(&js).await?;
    consume_with_idem(&after, &store, &glue).await?;

    println!(
        "{:<6} {:<46} {:>10} {:>14} {:>12}",
        "order", "what happened", "deliveries", "coupons before", "coupons after"
    );
    println!("{}", "-".repeat(92));
    let (mut total_before, mut total_after, mut deliveries) = (0, 0, 0);
    for &(order_id, copies, what) in ORDERS {
        let b = coupons(&pool, "demo_coupons_before", order_id).await?;
        let a = coupons(&pool, "demo_coupons_after", order_id).await?;
        println!("{order_id:<6} {what:<46} {copies:>10} {b:>14} {a:>12}");
        (total_before, total_after, deliveries) =
            (total_before + b, total_after + a, deliveries + copies);
    }
    println!("{}", "-".repeat(92));
    println!(
        "{deliveries} deliveries of {} orders: {total_before} coupons without idem, {total_after} with it.",
        ORDERS.len()
    );
    for name in ["DEMO_BEFORE", "DEMO_AFTER", "DEMO_AFTER_DEAD"] {
        let _ = js.delete_stream(name).await;
    }
    if total_after != ORDERS.len() as i64 {
        return Err("with idem, an order did not get exactly one coupon".into());
    }
    Ok(())
}
