//! Load benchmark of the SQL store against the hand-written baseline, side by side on the same
//! pool, in the same run, on PostgreSQL, MySQL/MariaDB and SQLite (a file).
//!
//! ```text
//! cargo bench -p idem-benches --all-features --bench sql_load
//! POSTGRES_URL=... MYSQL_URL=... IDEM_BENCH_SECS=3 cargo bench -p idem-benches --all-features --bench sql_load
//! ```
//!
//! For each database, scenario (first call of a key; duplicate of a completed key) and
//! concurrency (1 and 16 tasks), it runs, each for `IDEM_BENCH_SECS` seconds (default 3) after a
//! short warm-up, and prints calls/s and p50/p99 latency of:
//!
//! - `idem run`: [`idem_runtime::run`] on a [`SqlStore`] (lease, done mark, replay);
//! - `idem run_in_tx`: the transactional mode (begin a transaction, the done mark in it, commit);
//! - `baseline`: what a user writes by hand: `INSERT ... ON CONFLICT DO NOTHING` (MySQL:
//!   `INSERT IGNORE`), the handler if a row was inserted, then `UPDATE ... SET done`; a duplicate
//!   reads the stored output with a `SELECT`. No lease expiry, no token, no fence.
//!
//! The handler itself does nothing (it returns a small value), so the numbers are the cost of the
//! idempotency layer. A database that cannot be reached is skipped with a message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, Error, Options, SqlStore, Token, run};

const CONCURRENCY: [usize; 2] = [1, 16];
/// Completed keys prepared for the duplicate scenario, per implementation and cell.
const PREPARED: u64 = 2000;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Run,
    RunInTx,
    Baseline,
}

impl Impl {
    fn label(self) -> &'static str {
        match self {
            Impl::Run => "idem run",
            Impl::RunInTx => "idem run_in_tx",
            Impl::Baseline => "baseline",
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
    // Warm-up: connections opened, statements prepared.
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

fn print_row(db: &str, scenario: Scenario, imp: Impl, tasks: usize, c: &Cell) {
    println!(
        "| {db} | {} | {} | {tasks} | {:.0} | {:.2} | {:.2} |{}",
        scenario.label(),
        imp.label(),
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

/// One database: `$db` the sqlx type, `$pool` an expression giving `Option<Pool<$db>>`, `$claim`
/// the baseline's claim statement, `$p` the placeholder style.
macro_rules! bench_database {
    ($name:expr, $db:ty, $pool:expr, $claim:literal, $p:expr, $text:expr) => {{
        let name: &str = $name;
        match $pool {
            None => println!("| {name} | skipped: not reachable | | | | | |"),
            Some(pool) => {
                let pool: sqlx::Pool<$db> = pool;
                let idem_table = unique("idem_bench");
                let store = SqlStore::with_table(pool.clone(), &idem_table).unwrap();
                store.migrate().await.unwrap();
                let base = unique("base_bench");
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE {base} (k {text} PRIMARY KEY, state SMALLINT NOT NULL, output {text})",
                    text = $text
                )))
                .execute(&pool)
                .await
                .unwrap();
                let p = $p;
                let claim = Arc::new(format!($claim, base = base, p1 = p(1)));
                let done = Arc::new(format!(
                    "UPDATE {base} SET state = 1, output = {} WHERE k = {}",
                    p(1),
                    p(2)
                ));
                let read = Arc::new(format!("SELECT state, output FROM {base} WHERE k = {}", p(1)));
                for scenario in [Scenario::First, Scenario::Duplicate] {
                    for tasks in CONCURRENCY {
                        for imp in [Impl::Run, Impl::RunInTx, Impl::Baseline] {
                            let prefix = unique("k");
                            let opts = Arc::new(Options::with_scope(unique("bench")));
                            let key_of = {
                                let prefix = prefix.clone();
                                move |n: u64| match scenario {
                                    Scenario::First => format!("{prefix}-{n}"),
                                    Scenario::Duplicate => format!("{prefix}-{}", n % PREPARED),
                                }
                            };
                            let call = {
                                let (store, pool, opts) = (store.clone(), pool.clone(), opts.clone());
                                let (claim, done, read) = (claim.clone(), done.clone(), read.clone());
                                let key_of = key_of.clone();
                                move |n: u64| {
                                    let (store, pool, opts) = (store.clone(), pool.clone(), opts.clone());
                                    let (claim, done, read) = (claim.clone(), done.clone(), read.clone());
                                    let key = key_of(n);
                                    async move {
                                        match imp {
                                            Impl::Run => {
                                                let out: Result<u64, Error> =
                                                    run(&store, &opts, Call::new(&key), || async { Ok(n) }).await;
                                                out.is_ok()
                                            }
                                            Impl::RunInTx => {
                                                let out: Result<u64, Error> = store
                                                    .run_in_tx(&opts, Call::new(&key), move |_tx| {
                                                        Box::pin(async move { Ok(n) })
                                                    })
                                                    .await;
                                                out.is_ok()
                                            }
                                            Impl::Baseline => {
                                                let inserted = sqlx::query(AssertSqlSafe(claim.as_str().to_owned()))
                                                    .bind(&key)
                                                    .execute(&pool)
                                                    .await;
                                                match inserted {
                                                    Ok(r) if r.rows_affected() == 1 => {
                                                        let output = n.to_string(); // the handler
                                                        sqlx::query(AssertSqlSafe(done.as_str().to_owned()))
                                                            .bind(&output)
                                                            .bind(&key)
                                                            .execute(&pool)
                                                            .await
                                                            .is_ok()
                                                    }
                                                    Ok(_) => {
                                                        let row: Result<(i16, Option<String>), _> =
                                                            sqlx::query_as(AssertSqlSafe(read.as_str().to_owned()))
                                                                .bind(&key)
                                                                .fetch_one(&pool)
                                                                .await;
                                                        row.is_ok()
                                                    }
                                                    Err(_) => false,
                                                }
                                            }
                                        }
                                    }
                                }
                            };
                            if scenario == Scenario::Duplicate {
                                for n in 0..PREPARED {
                                    assert!(call(n).await, "preparing the duplicate scenario");
                                }
                            }
                            let cell = measure(tasks, secs(), call).await;
                            print_row(name, scenario, imp, tasks, &cell);
                        }
                    }
                }
                for t in [idem_table.clone(), format!("{idem_table}_migrations"), base] {
                    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {t}")))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            }
        }
    }};
}

fn dollar(n: usize) -> String {
    format!("${n}")
}

fn question(_: usize) -> String {
    "?".to_owned()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only for a bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "\n{} s per cell, handler does nothing; latency in ms\n",
        secs().as_secs_f64()
    );
    println!("| database | scenario | implementation | tasks | calls/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|");

    let pg_url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .connect(&pg_url)
        .await
        .map_err(|e| eprintln!("PostgreSQL at {pg_url} not reachable: {e}"))
        .ok();
    bench_database!(
        "PostgreSQL",
        sqlx::Postgres,
        pg,
        "INSERT INTO {base} (k, state) VALUES ({p1}, 0) ON CONFLICT DO NOTHING",
        dollar,
        "TEXT"
    );

    let my_url = std::env::var("MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let my = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(24)
        .connect(&my_url)
        .await
        .map_err(|e| eprintln!("MySQL/MariaDB at {my_url} not reachable: {e}"))
        .ok();
    bench_database!(
        "MariaDB",
        sqlx::MySql,
        my,
        "INSERT IGNORE INTO {base} (k, state) VALUES ({p1}, 0)",
        question,
        "VARCHAR(100)"
    );

    let path = std::env::temp_dir().join(format!("idem-bench-{}.sqlite", std::process::id()));
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let lite = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(24)
        .connect_with(opts)
        .await
        .ok();
    bench_database!(
        "SQLite (file, WAL)",
        sqlx::Sqlite,
        lite,
        "INSERT INTO {base} (k, state) VALUES ({p1}, 0) ON CONFLICT DO NOTHING",
        question,
        "TEXT"
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
