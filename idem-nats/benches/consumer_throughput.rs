//! Consumer throughput on NATS JetStream with and without idem: the same durable pull consumer,
//! the same prefetch (messages per pull request, and as many settled at once), the same trivial
//! handler (it returns the order id), at prefetch 16 and 64:
//!
//! - `none`: no idem, `message.ack()`;
//! - `redis`: `#[idempotent]` on the Redis store, through `Glue::settle` (double ack, the
//!   default), and `redis-1ack` the same with `double_ack(false)`, the baseline's ack;
//! - `layered`: `#[idempotent]` on a `LayeredStore` (Redis in front of PostgreSQL);
//! - `pg-tx`: `#[idempotent(tx = "tx")]` on PostgreSQL, the caller beginning and committing.
//!
//! ```sh
//! cargo bench -p idem-nats --bench consumer_throughput
//! # IDEM_BENCH_MESSAGES (per cell, default 10000), IDEM_BENCH_ROUNDS (default 3, medians),
//! # NATS_URL, REDIS_URL, POSTGRES_URL
//! ```
//! Rounds are interleaved (every cell once, then again), and each cell's median is printed.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::StreamExt as _;
use idem_nats::Glue;
use idem_runtime::sqlx::{self, PgPool, Postgres, Transaction};
use idem_runtime::{LayeredStore, PgStore, RedisStore, Store, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[idempotent(key = "id", store = "store", scope = "bench.nats.plain")]
async fn handle<S: Store>(store: &S, id: i64) -> Result<i64, AppError> {
    Ok(id)
}

#[idempotent(key = "id", tx = "tx", store = "store", scope = "bench.nats.tx")]
async fn handle_tx(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
) -> Result<i64, AppError> {
    Ok(id)
}

async fn on_message_tx(store: &PgStore, id: i64) -> Result<i64, AppError> {
    let mut tx = store.pool().begin().await?;
    let out = handle_tx(store, &mut tx, id).await?;
    tx.commit().await?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    None,
    Redis,
    RedisSingleAck,
    Layered,
    PgTx,
    /// The Redis handler called without the glue, then `message.ack()`: what the glue costs.
    RedisDirect,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Redis => "redis",
            Mode::RedisSingleAck => "redis-1ack",
            Mode::Layered => "layered",
            Mode::PgTx => "pg-tx",
            Mode::RedisDirect => "redis-noglue",
        }
    }
}

struct Env {
    js: jetstream::Context,
    redis: RedisStore,
    layered: LayeredStore<RedisStore, PgStore>,
    pg: PgStore,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A stream of `n` orders with distinct ids, and its consumer.
async fn fill(js: &jetstream::Context, name: &str, n: usize, base: i64) -> PullConsumer {
    let _ = js.delete_stream(name).await;
    let subject = format!("bench.{name}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut acks = Vec::with_capacity(1024);
    for i in 0..n {
        acks.push(
            js.publish(subject.clone(), (base + i as i64).to_string().into())
                .await
                .unwrap(),
        );
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("bench".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Consume all `n` messages; messages per second.
async fn run(e: &Env, mode: Mode, prefetch: usize, n: usize, base: i64) -> f64 {
    let name = format!("BENCH_{}_{prefetch}", mode.name().replace('-', "_"));
    let consumer = fill(&e.js, &name, n, base).await;
    let glue = Glue::new(&consumer).double_ack(mode != Mode::RedisSingleAck);
    let started = Instant::now();
    let messages = consumer
        .stream()
        .max_messages_per_batch(prefetch)
        .messages()
        .await
        .unwrap();
    messages
        .take(n)
        .for_each_concurrent(prefetch, |msg| {
            let glue = &glue;
            async move {
                let msg = msg.unwrap();
                let id: i64 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
                match mode {
                    Mode::None => {
                        let _ = std::hint::black_box(id);
                        msg.ack().await.unwrap();
                    }
                    Mode::Redis | Mode::RedisSingleAck => {
                        glue.settle(msg, || handle(&e.redis, id)).await.unwrap();
                    }
                    Mode::Layered => {
                        glue.settle(msg, || handle(&e.layered, id)).await.unwrap();
                    }
                    Mode::RedisDirect => {
                        handle(&e.redis, id).await.unwrap();
                        msg.ack().await.unwrap();
                    }
                    Mode::PgTx => {
                        glue.settle(msg, || on_message_tx(&e.pg, id)).await.unwrap();
                    }
                }
            }
        })
        .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let state = consumer.get_info().await.unwrap();
    assert_eq!(state.num_pending, 0);
    let _ = e.js.delete_stream(&name).await;
    rate
}

#[tokio::main]
async fn main() {
    let n: usize = env("IDEM_BENCH_MESSAGES", "10000").parse().unwrap();
    let rounds: usize = env("IDEM_BENCH_ROUNDS", "3").parse().unwrap();
    let js = jetstream::new(
        async_nats::connect(env("NATS_URL", "127.0.0.1:4222"))
            .await
            .unwrap(),
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(40)
        .connect(&env(
            "POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ))
        .await
        .unwrap();
    let pg = PgStore::with_table(pool.clone(), "idem_bench_nats").unwrap();
    pg.migrate().await.unwrap();
    sqlx::query("TRUNCATE idem_bench_nats")
        .execute(&pool)
        .await
        .unwrap();
    let redis = RedisStore::from_url(&env("REDIS_URL", "redis://127.0.0.1:6379"))
        .await
        .unwrap();
    let layered = LayeredStore::new(redis.clone(), pg.clone());
    let e = Env {
        js,
        redis,
        layered,
        pg,
    };
    let _: &PgPool = e.pg.pool();
    let all = [
        Mode::None,
        Mode::Redis,
        Mode::RedisSingleAck,
        Mode::RedisDirect,
        Mode::Layered,
        Mode::PgTx,
    ];
    // IDEM_BENCH_MODES=none,redis,...: a subset (the first is the baseline of the ratios).
    let only = env(
        "IDEM_BENCH_MODES",
        "none,redis,redis-1ack,redis-noglue,layered,pg-tx",
    );
    let modes: Vec<Mode> = only
        .split(',')
        .filter_map(|n| all.iter().copied().find(|m| m.name() == n))
        .collect();
    let prefetches = [16usize, 64];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len() * prefetches.len()];
    // Ids never repeat across cells and rounds: every call is a first call.
    let mut base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        * 1_000_000_000;
    for round in 0..rounds {
        for (p, &prefetch) in prefetches.iter().enumerate() {
            for (m, &mode) in modes.iter().enumerate() {
                let rate = run(&e, mode, prefetch, n, base).await;
                base += n as i64;
                eprintln!(
                    "round {round}: prefetch {prefetch:>2} {:<10} {rate:>9.0} msg/s",
                    mode.name()
                );
                results[p * modes.len() + m].push(rate);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("| prefetch | consumer | msg/s (median of {rounds}) | min-max | vs. without idem |");
    println!("|---:|---|---:|---:|---:|");
    for (p, &prefetch) in prefetches.iter().enumerate() {
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (base_rate, ..) = median(&mut results[p * modes.len()].clone());
        for (m, &mode) in modes.iter().enumerate() {
            let (med, lo, hi) = median(&mut results[p * modes.len() + m]);
            println!(
                "| {prefetch} | {} | {med:.0} | {lo:.0}-{hi:.0} | {:.2}x |",
                mode.name(),
                med / base_rate
            );
        }
    }
    idem_runtime::wait_for_background(Duration::from_secs(5)).await;
}
