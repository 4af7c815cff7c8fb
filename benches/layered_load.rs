//! Load benchmark of the layered store (Redis in front of PostgreSQL) against PostgreSQL alone,
//! side by side in the same run: what the Redis layer saves on duplicates, and what it adds to
//! first calls.
//!
//! ```text
//! cargo bench -p idem-benches --all-features --bench layered_load
//! REDIS_URL=... POSTGRES_URL=... IDEM_BENCH_SECS=3 cargo bench -p idem-benches --all-features --bench layered_load
//! ```
//!
//! For each scenario (first call of a key; duplicate of a completed key) and concurrency (1 and 16
//! tasks) it runs [`idem_runtime::run`], each for `IDEM_BENCH_SECS` seconds (default 3) after a
//! short warm-up, on:
//!
//! - `SqlStore (PostgreSQL)`: the database alone;
//! - `LayeredStore (Redis + PostgreSQL)`: Redis at `REDIS_URL` in front of the same database;
//! - `LayeredStore, Redis down`: the same, with its Redis killed (a private `redis-server` started
//!   and killed by the benchmark): every call degrades to the database;
//! - `RedisStore alone`: for reference, the front without the database behind it.
//!
//! and prints calls/s and p50/p99 latency. The handler does nothing, so the numbers are the cost
//! of the idempotency layer. A server that cannot be reached is reported and its rows skipped.

#[path = "../tests/redis_support/mod.rs"]
mod redis_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, Error, LayeredStore, Options, PgStore, RedisStore, Store, Token, run};

const CONCURRENCY: [usize; 2] = [1, 16];
/// Completed keys prepared for the duplicate scenario, per implementation and cell.
const PREPARED: u64 = 2000;
/// Long enough for the run; short, so a shared Redis does not keep the records for long.
const KEEP: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    First,
    Duplicate,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::First => "first call of a key",
            Scenario::Duplicate => "duplicate of a completed key",
        }
    }
}

fn secs() -> Duration {
    let s: f64 = std::env::var("IDEM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Token::generate().to_hex())
}

#[derive(Debug)]
struct Cell {
    calls: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// Run `call(key_number)` from `tasks` tasks for `dur` after a warm-up; keys come from a shared
/// counter (the duplicate scenario maps them onto the prepared keys).
async fn measure<F, Fut>(tasks: usize, dur: Duration, call: F) -> Cell
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(1_000_000));
    // Warm-up: connections opened, statements prepared, scripts loaded.
    for _ in 0..tasks.min(4) * 20 {
        call(next.fetch_add(1, Ordering::Relaxed)).await;
    }
    let start = Instant::now();
    let until = start + dur;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut errors = 0;
                while Instant::now() < until {
                    let t = Instant::now();
                    if !call(next.fetch_add(1, Ordering::Relaxed)).await {
                        errors += 1;
                    }
                    lat.push(t.elapsed());
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (lat, e) = h.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Cell {
        calls: all.len() as u64,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
    }
}

/// One cell: `store` under `scenario` at `tasks`.
async fn cell(label: &str, store: Arc<dyn Store>, scenario: Scenario, tasks: usize) {
    let prefix = unique("k");
    let opts = Arc::new(Options::with_scope(unique("bench")).keep(KEEP));
    let call = move |n: u64| {
        let (store, opts) = (store.clone(), opts.clone());
        let key = match scenario {
            Scenario::First => format!("{prefix}-{n}"),
            Scenario::Duplicate => format!("{prefix}-{}", n % PREPARED),
        };
        async move {
            let out: Result<u64, Error> =
                run(&store, &opts, Call::new(&key), || async { Ok(n) }).await;
            out.is_ok()
        }
    };
    if scenario == Scenario::Duplicate {
        for n in 0..PREPARED {
            assert!(call(n).await, "preparing the duplicate scenario");
        }
    }
    let c = measure(tasks, secs(), call).await;
    println!(
        "| {} | {label} | {tasks} | {:.0} | {:.2} | {:.2} |{}",
        scenario.label(),
        c.calls as f64 / c.elapsed.as_secs_f64(),
        c.p50.as_secs_f64() * 1e3,
        c.p99.as_secs_f64() * 1e3,
        if c.errors > 0 {
            format!(" {} errors", c.errors)
        } else {
            String::new()
        }
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for a bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let pg_url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(&pg_url)
        .await
        .map_err(|e| eprintln!("PostgreSQL at {pg_url} not reachable: {e}: nothing to measure"))
    else {
        return;
    };
    let table = unique("idem_lb");
    let durable = PgStore::with_table(pool.clone(), &table).unwrap();
    durable.migrate().await.unwrap();

    let redis_url = redis_support::redis_url();
    let front = RedisStore::from_url(&redis_url)
        .await
        .map_err(|e| eprintln!("Redis at {redis_url} not reachable: {e}: layered rows skipped"))
        .ok();
    // A Redis that is down: started, connected to, then killed.
    let mut dead = redis_support::RedisServer::start()
        .map_err(|e| eprintln!("no private redis-server ({e}): the Redis-down rows are skipped"))
        .ok();
    let dead_front = match &mut dead {
        Some(server) => {
            let store = RedisStore::from_url(&server.url()).await.unwrap();
            server.kill();
            Some(store)
        }
        None => None,
    };

    println!(
        "\n{} s per cell, handler does nothing; latency in ms\n",
        secs().as_secs_f64()
    );
    println!("| scenario | store | tasks | calls/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    let mut stores: Vec<(&str, Arc<dyn Store>)> =
        vec![("SqlStore (PostgreSQL) alone", Arc::new(durable.clone()))];
    if let Some(front) = &front {
        stores.push((
            "LayeredStore (Redis + PostgreSQL)",
            Arc::new(LayeredStore::new(front.clone(), durable.clone())),
        ));
    }
    if let Some(dead_front) = dead_front {
        stores.push((
            "LayeredStore, Redis down (degraded)",
            Arc::new(LayeredStore::new(dead_front, durable.clone())),
        ));
    }
    if let Some(front) = front {
        stores.push(("RedisStore alone (reference)", Arc::new(front)));
    }
    for scenario in [Scenario::Duplicate, Scenario::First] {
        for tasks in CONCURRENCY {
            for (label, store) in &stores {
                cell(label, store.clone(), scenario, tasks).await;
            }
        }
    }
    for t in [table.clone(), format!("{table}_migrations")] {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {t}")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
