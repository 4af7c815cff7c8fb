//! Several OS processes race on the same keys through the layered store (Redis in front of
//! PostgreSQL): each key's effect, counted outside the processes (a row in a PostgreSQL table
//! without a unique key), happens exactly once, and every process gets the same output for a
//! key. Once on the shared Redis, and once on a private Redis that the parent flushes again and
//! again while the children race, so the database's unique key has to do the work.
//!
//! The test re-executes its own binary as the child processes (`race_child`, which does nothing
//! in a normal test run), and starts them all at once with a line on their stdin.
mod redis_support;
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idem_runtime::redis;
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool};
use idem_runtime::{Call, Error, LayeredStore, Options, PgStore, RedisStore, Token, run};
use redis_support::{redis_url, signal, start_or_skip};

const CHILDREN: usize = 4;
const KEYS: u32 = 40;
/// Deliveries of each key per child, all at once.
const COPIES: u32 = 3;
const ROLE_VAR: &str = "IDEM_LAYERED_RACE";

fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn pool() -> Option<PgPool> {
    let url = postgres_url();
    match sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&url)
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            support::server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

#[test]
fn processes_racing_on_the_same_keys_run_each_effect_once() {
    if std::env::var_os(ROLE_VAR).is_some() {
        return; // this is a child: only `race_child` runs
    }
    race(&redis_url(), None);
}

#[test]
fn processes_racing_while_redis_is_flushed_run_each_effect_once() {
    if std::env::var_os(ROLE_VAR).is_some() {
        return;
    }
    let Some(server) = start_or_skip() else {
        return;
    };
    race(&server.url(), Some(&server.url()));
}

/// Start the children on `redis`, let them race, flushing `flush` (a private server) meanwhile.
fn race(redis: &str, flush: Option<&str>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(pool) = rt.block_on(pool()) else {
        return;
    };
    if rt.block_on(redis_support::shared_conn()).is_none() && flush.is_none() {
        return;
    }
    let token = Token::generate().to_hex();
    let scope = format!("idem-layered-race:{token}");
    let table = format!("layered_race_{token}");
    rt.block_on(async {
        // Both migrate at start-up in real deployments; do it once here so children start fast.
        PgStore::new(pool.clone()).migrate().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {table} (k INT NOT NULL, pid INT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
    });

    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for _ in 0..CHILDREN {
        let mut child = Command::new(&exe)
            .args(["race_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, format!("{scope},{table}"))
            .env("REDIS_URL", redis)
            .env("POSTGRES_URL", postgres_url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a child process");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        children.push((child, stdout.lines()));
    }
    // Each child says "ready" once connected; then all get "go" together.
    for (_, lines) in &mut children {
        loop {
            let line = lines.next().expect("child exited before ready").unwrap();
            // libtest may print "test race_child ... " on the same line first.
            if line.ends_with("race: ready") {
                break;
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = flush.map(|url| {
        let (stop, url) = (stop.clone(), url.to_owned());
        rt.spawn(async move {
            let mut admin = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut flushes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let _: () = redis::cmd("FLUSHALL")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                flushes += 1;
                // Pacing, not synchronisation: let some records live between two flushes.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            flushes
        })
    });
    for (child, _) in &mut children {
        signal(child.stdin.as_mut().unwrap());
    }
    // Collect "race: out <key> <output>" from every child.
    let mut outputs: HashMap<u32, Vec<String>> = HashMap::new();
    for (mut child, lines) in children {
        for line in lines {
            let line = line.unwrap();
            if let Some((_, rest)) = line.split_once("race: out ") {
                let (k, v) = rest.split_once(' ').unwrap();
                outputs
                    .entry(k.parse().unwrap())
                    .or_default()
                    .push(v.to_owned());
            }
        }
        assert!(child.wait().unwrap().success(), "a child process failed");
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(flusher) = flusher {
        let flushes = rt.block_on(flusher).unwrap();
        eprintln!("{flushes} FLUSHALLs during the race");
        assert!(
            flushes >= 3,
            "only {flushes} flushes happened during the race"
        );
    }

    assert_eq!(outputs.len(), KEYS as usize);
    for (k, outs) in &outputs {
        assert_eq!(outs.len(), CHILDREN * COPIES as usize, "key {k}: {outs:?}");
        assert!(
            outs.windows(2).all(|w| w[0] == w[1]),
            "key {k} answered differently: {outs:?}"
        );
    }
    rt.block_on(async {
        let effects: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT k, count(*) FROM {table} GROUP BY k ORDER BY k"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(effects.len(), KEYS as usize, "effects missing: {effects:?}");
        for (k, n) in effects {
            assert_eq!(n, 1, "key {k}: the effect ran {n} times");
        }
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}")))
            .execute(&pool)
            .await
            .unwrap();
    });
}

/// The child process: every key `COPIES` times at once, each call a delivery that waits for an
/// in-flight holder and replays its output; the handler's effect is a row in PostgreSQL.
#[test]
fn race_child() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return; // a normal test run
    };
    let (scope, table) = role.split_once(',').unwrap();
    let (scope, table) = (scope.to_owned(), Arc::new(table.to_owned()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = pool().await.expect("PostgreSQL");
        let front = RedisStore::from_url(&redis_url()).await.unwrap();
        let store = LayeredStore::new(front, PgStore::new(pool.clone()));
        println!("race: ready");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();

        let opts = Options::with_scope(scope).wait(Duration::from_secs(60));
        let pid = std::process::id();
        let mut tasks = Vec::new();
        for _ in 0..COPIES {
            for k in 0..KEYS {
                let (store, opts, pool, table) =
                    (store.clone(), opts.clone(), pool.clone(), table.clone());
                tasks.push(tokio::spawn(async move {
                    let out: Result<String, Error> =
                        run(&store, &opts, Call::new(&k), || async move {
                            sqlx::query(AssertSqlSafe(format!(
                                "INSERT INTO {table} (k, pid) VALUES ($1, $2)"
                            )))
                            .bind(k as i32)
                            .bind(pid as i32)
                            .execute(&pool)
                            .await
                            .expect("count the effect");
                            // Long enough that the other processes arrive while it is in flight.
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            Ok(format!("pid{pid}-key{k}"))
                        })
                        .await;
                    (k, out.expect("call failed"))
                }));
            }
        }
        for t in tasks {
            let (k, out) = t.await.unwrap();
            println!("race: out {k} {out}");
        }
    });
}
