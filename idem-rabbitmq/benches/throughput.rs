//! Consumer throughput on RabbitMQ with and without idem: the same consumer (deliveries handled
//! `prefetch` at a time, one ack each), the same trivial handler, at prefetch 16 and 64:
//! without idem; the plain attribute on Redis; on the layered store (Redis + PostgreSQL); the
//! transactional attribute on PostgreSQL (begin, call, commit). Every message is a first call
//! (a new order). Medians of 3 interleaved rounds.
//!
//! `cargo bench -p idem-rabbitmq --bench throughput` (RabbitMQ, Redis and PostgreSQL on
//! loopback: AMQP_URL, REDIS_URL, POSTGRES_URL). `IDEM_BENCH_MESSAGES` (default 5000) per run.

use std::time::Instant;

use futures_util::StreamExt;
use idem_rabbitmq::Glue;
use idem_runtime::sqlx::{PgPool, Postgres, Transaction, postgres::PgPoolOptions};
use idem_runtime::{LayeredStore, PgStore, RedisStore, idempotent};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] idem_runtime::sqlx::Error),
}

#[idempotent(key = "{run}:{order}", store = "store", scope = "bench.rmq.redis")]
async fn on_redis(store: &RedisStore, run: &str, order: u64) -> Result<u64, AppError> {
    Ok(order)
}

type Layered = LayeredStore<RedisStore, PgStore>;

#[idempotent(key = "{run}:{order}", store = "store", scope = "bench.rmq.layered")]
async fn on_layered(store: &Layered, run: &str, order: u64) -> Result<u64, AppError> {
    Ok(order)
}

#[idempotent(
    key = "{run}:{order}",
    tx = "tx",
    store = "store",
    scope = "bench.rmq.tx"
)]
async fn in_tx(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    run: &str,
    order: u64,
) -> Result<u64, AppError> {
    Ok(order)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Redis,
    Layered,
    Tx,
}

impl std::ops::Deref for Env {
    type Target = EnvInner;
    fn deref(&self) -> &EnvInner {
        &self.inner
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "without idem",
            Mode::Redis => "plain attribute, Redis",
            Mode::Layered => "plain attribute, layered (Redis + PostgreSQL)",
            Mode::Tx => "transactional attribute, PostgreSQL",
        }
    }
}

#[derive(Clone)]
struct Env {
    inner: std::sync::Arc<EnvInner>,
}

struct EnvInner {
    conn: Connection,
    redis: RedisStore,
    layered: Layered,
    pg: PgStore,
    pool: PgPool,
}

async fn run_once(env: &Env, mode: Mode, prefetch: u16, n: u64, round: usize) -> f64 {
    let queue = format!("idem_bench_tp_{}_{prefetch}_{round}", std::process::id());
    let run = format!("{queue}_{}", mode.name().len());
    let glue = Glue::builder(&queue).build(&env.conn).await.unwrap();
    let ch = env.conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        glue.topology().queue_arguments(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for order in 0..n {
        // Not awaited one by one: `wait_for_confirms` below collects them.
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &order.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        drop(confirm);
    }
    ch.wait_for_confirms().await.unwrap();
    let cch = env.conn.create_channel().await.unwrap();
    cch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    // One task per delivery, at most `prefetch` at once, on the multi-thread runtime: the same
    // for every consumer, so that the handler's work can use both cores.
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(prefetch)));
    let mut consumer = consumer.take(n as usize);
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(d) = consumer.next().await {
        let d = d.unwrap();
        let permit = permits.clone().acquire_owned().await.unwrap();
        let (env, glue, run) = (env.clone(), glue.clone(), run.clone());
        tasks.spawn(async move {
            let order = u64::from_be_bytes(d.data[..8].try_into().unwrap());
            match mode {
                Mode::Plain => {
                    std::hint::black_box(order);
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
                Mode::Redis => {
                    glue.settle(&d, on_redis(&env.redis, &run, order))
                        .await
                        .unwrap();
                }
                Mode::Layered => {
                    glue.settle(&d, on_layered(&env.layered, &run, order))
                        .await
                        .unwrap();
                }
                Mode::Tx => {
                    glue.settle(&d, async {
                        let mut tx = env.pool.begin().await?;
                        let c = in_tx(&env.pg, &mut tx, &run, order).await?;
                        tx.commit().await?;
                        Ok::<_, AppError>(c)
                    })
                    .await
                    .unwrap();
                }
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = cch.close(200, "ok".into()).await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(
            glue.topology().dead_letter_queue().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    rate
}

#[tokio::main]
async fn main() {
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg_url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let n: u64 = std::env::var("IDEM_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let redis = RedisStore::from_url(&redis_url).await.expect("Redis");
    let pool = PgPoolOptions::new()
        .max_connections(70)
        .connect(&pg_url)
        .await
        .expect("PostgreSQL");
    let table = format!("idem_bench_rmq_{}", std::process::id());
    let pg = PgStore::with_table(pool.clone(), &table).unwrap();
    pg.migrate().await.unwrap();
    let layered = LayeredStore::new(RedisStore::from_url(&redis_url).await.unwrap(), pg.clone());
    let env = Env {
        inner: std::sync::Arc::new(EnvInner {
            conn,
            redis,
            layered,
            pg,
            pool: pool.clone(),
        }),
    };
    let modes = [Mode::Plain, Mode::Redis, Mode::Layered, Mode::Tx];
    println!("{n} messages per run, medians of 3 interleaved rounds (msg/s)\n");
    println!("| consumer | prefetch 16 | ratio | prefetch 64 | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let mut rates = vec![[Vec::new(), Vec::new()]; modes.len()];
    for round in 0..3 {
        for (p, prefetch) in [16u16, 64].into_iter().enumerate() {
            for (m, mode) in modes.iter().enumerate() {
                rates[m][p].push(run_once(&env, *mode, prefetch, n, round).await);
            }
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = [med(&rates[0][0]), med(&rates[0][1])];
    for (m, mode) in modes.iter().enumerate() {
        let (a, b) = (med(&rates[m][0]), med(&rates[m][1]));
        println!(
            "| {} | {a:.0} | {:.2}x | {b:.0} | {:.2}x |",
            mode.name(),
            a / base[0],
            b / base[1]
        );
    }
    for t in [table.clone(), format!("{table}_migrations")] {
        let _ = idem_runtime::sqlx::raw_sql(idem_runtime::sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {t}"
        )))
        .execute(&pool)
        .await;
    }
}
