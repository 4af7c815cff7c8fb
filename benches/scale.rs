//! A load run of many distinct keys (1,000,000 by default) through the Redis store and the
//! PostgreSQL store, each a first call (claim, a handler that does nothing, mark) with records
//! kept for `IDEM_SCALE_KEEP_SECS` (20 s): throughput over time, in tenths of the run, beside
//! what the store holds then (Redis: keys of this run and `used_memory`; PostgreSQL: rows and the
//! table's size, with `purge_continuously` running as a service would run it). The question it
//! answers: does a call get slower as the store fills up and is purged?
//!
//! ```text
//! cargo bench -p idem-benches --features redis,postgres --bench scale
//! IDEM_SCALE_KEYS=1000000 IDEM_SCALE_TASKS=32 IDEM_SCALE_ONLY=redis|postgres \
//!   cargo bench -p idem-benches --features redis,postgres --bench scale
//! ```
//!
//! Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`), PostgreSQL at `POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`). The Redis keys (under a prefix of this
//! run) and the table are removed at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::redis::aio::ConnectionManager;
use idem_runtime::{Call, Error, Options, PgStore, RedisStore, Store, Token, redis, run, sqlx};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the store holds at a point of the run, as one table cell.
type Census = Box<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Run `keys` first calls with `tasks` tasks through `store`, printing a row per tenth.
async fn drive(
    name: &str,
    store: Arc<dyn Store>,
    keys: u64,
    tasks: u64,
    keep: Duration,
    census: Census,
) {
    let opts =
        Arc::new(Options::with_scope(format!("scale:{}", Token::generate().to_hex())).keep(keep));
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..tasks {
        let (store, opts, next, done) = (store.clone(), opts.clone(), next.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= keys {
                    return;
                }
                let out: Result<u64, Error> =
                    run(&*store, &opts, Call::new(&n), || async move { Ok(n) }).await;
                assert_eq!(out.expect("a first call failed"), n);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    println!(
        "\n{name}: {keys} keys, {tasks} tasks, records kept {} s\n",
        keep.as_secs()
    );
    println!("| keys done | elapsed | calls/s in this tenth | store holds |");
    println!("|---:|---:|---:|---|");
    let (mut last_n, mut last_t) = (0u64, Duration::ZERO);
    for tenth in 1..=10u64 {
        let target = keys * tenth / 10;
        // Polled: the workers are counted, not signalled, so the row is a snapshot.
        while done.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (n, t) = (done.load(Ordering::Relaxed), started.elapsed());
        let rate = (n - last_n) as f64 / (t - last_t).as_secs_f64();
        println!(
            "| {n} | {:.1} s | {rate:.0} | {} |",
            t.as_secs_f64(),
            census().await
        );
        (last_n, last_t) = (n, t);
    }
    for w in workers {
        w.await.unwrap();
    }
    println!(
        "\n{name}: {:.0} calls/s over the whole run",
        keys as f64 / started.elapsed().as_secs_f64()
    );
}

async fn redis_run(keys: u64, tasks: u64, keep: Duration) {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.clone()).expect("REDIS_URL");
    let conn = match ConnectionManager::new(client).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Redis at {url} not reachable ({e}): skipped");
            return;
        }
    };
    let prefix = format!("idem-scale:{}:", Token::generate().to_hex());
    let store = RedisStore::builder(conn.clone())
        .prefix(prefix.clone())
        .build();
    let census: Census = {
        let conn = conn.clone();
        Box::new(move || {
            let mut conn = conn.clone();
            Box::pin(async move {
                let info: String = redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let used = info
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory_human:"))
                    .unwrap_or("?")
                    .trim()
                    .to_owned();
                let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
                format!("{dbsize} keys in the database, used_memory {used}")
            })
        })
    };
    drive("Redis", Arc::new(store), keys, tasks, keep, census).await;
    // Remove this run's keys.
    let mut conn = conn;
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !found.is_empty() {
            let _: u64 = redis::cmd("UNLINK")
                .arg(&found)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

async fn postgres_run(keys: u64, tasks: u64, keep: Duration) {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(&url)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("PostgreSQL at {url} not reachable ({e}): skipped");
            return;
        }
    };
    let table = format!("idem_scale_{}", &Token::generate().to_hex()[..12]);
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    // As a service runs it: every second, in batches of 10,000.
    let purger = tokio::spawn(
        store
            .clone()
            .purge_continuously(Duration::from_secs(1), 10_000),
    );
    let census: Census = {
        let (pool, table) = (pool.clone(), table.clone());
        Box::new(move || {
            let (pool, table) = (pool.clone(), table.clone());
            Box::pin(async move {
                let (rows, bytes): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT (SELECT count(*) FROM {table}), pg_total_relation_size('{table}')"
                )))
                .fetch_one(&pool)
                .await
                .unwrap();
                format!("{rows} rows, {:.1} MB with indexes", bytes as f64 / 1e6)
            })
        })
    };
    drive("PostgreSQL", Arc::new(store), keys, tasks, keep, census).await;
    purger.abort();
    for t in [table.clone(), format!("{table}_migrations")] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
            .execute(&pool)
            .await;
    }
}

fn main() {
    // `cargo test --benches` runs it without `--bench`: then only check that it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let keys = env_u64("IDEM_SCALE_KEYS", 1_000_000);
    let tasks = env_u64("IDEM_SCALE_TASKS", 32);
    let keep = Duration::from_secs(env_u64("IDEM_SCALE_KEEP_SECS", 20));
    let only = std::env::var("IDEM_SCALE_ONLY").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if only.as_deref().is_none_or(|o| o == "redis") {
            redis_run(keys, tasks, keep).await;
        }
        if only.as_deref().is_none_or(|o| o == "postgres") {
            postgres_run(keys, tasks, keep).await;
        }
    });
}
