//! Tests shared by the SQL store's backends (`tests/sql_postgres.rs`, `sql_mysql.rs`,
//! `sql_sqlite.rs`): `sql_store_tests!` stamps them out for one database, so every body is
//! concrete sqlx code.
//!
//! The multi-process tests re-run the test binary itself as worker processes
//! (`<binary> --exact worker_process`, with `IDEM_SQL_WORKER` set); in a normal run
//! `worker_process` returns at once.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// SQL text that differs between the databases in the tests' own tables.
#[derive(Debug, Clone, Copy)]
pub struct Dialect {
    /// A text column for message keys.
    pub text: &'static str,
    /// An auto-incrementing primary key column.
    pub serial_pk: &'static str,
    /// Placeholder `n` (1-based).
    pub placeholder: fn(usize) -> String,
}

pub fn dollar(n: usize) -> String {
    format!("${n}")
}

pub fn question(_: usize) -> String {
    "?".to_owned()
}

impl Dialect {
    pub fn p(&self, n: usize) -> String {
        (self.placeholder)(n)
    }
}

/// A name no other run uses (tables of one test run).
pub fn unique(prefix: &str) -> String {
    // The whole token: its upper half is random per process, its lower half counts.
    format!("{prefix}_{}", idem_runtime::Token::generate().to_hex())
}

/// A small deterministic PRNG (xorshift64*), seeded per run and printed, so a failing schedule can
/// be replayed with `IDEM_SEED`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("IDEM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    ^ u64::from(std::process::id())
            });
        eprintln!("IDEM_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The name of the running test (libtest names each test's thread after it); worker processes
/// get their parent's. The SQLite tests give each test its own database file by it, so that one
/// test's long write transactions cannot starve another's lease renewals.
pub fn test_name() -> String {
    std::env::var("IDEM_SQL_TEST_NAME").unwrap_or_else(|_| {
        std::thread::current()
            .name()
            .unwrap_or("main")
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    })
}

/// Which worker a child process is, and what it works on.
pub fn worker_role() -> Option<(String, Vec<String>)> {
    let role = std::env::var("IDEM_SQL_WORKER").ok()?;
    let args = std::env::var("IDEM_SQL_WORKER_ARGS")
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    Some((role, args))
}

/// Start this test binary as a worker process. Its `IDEM-RESULT` lines are read back when
/// `capture` is set; otherwise its output is discarded.
pub fn spawn_worker(role: &str, args: &[String], capture: bool) -> std::process::Child {
    use std::process::Stdio;
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDEM_SQL_WORKER", role)
        .env("IDEM_SQL_TEST_NAME", test_name())
        .env("IDEM_SQL_WORKER_ARGS", args.join(","))
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a worker process")
}

/// The lines a worker printed with the `IDEM-RESULT ` prefix.
pub fn results(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // libtest may have printed "test worker_process ... " on the same line.
        .filter_map(|l| l.split_once("IDEM-RESULT ").map(|(_, r)| r.to_owned()))
        .collect()
}

/// Worker processes that are killed (SIGKILL) when this is dropped, also when a test panics.
#[derive(Debug)]
pub struct Workers(pub Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Appends one line to a file shared by processes (each line is one `write` with `O_APPEND`).
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// Where the SIGKILL test's workers count their handler executions: a file, not the database,
/// so that counting never waits for a lock the handler's own transaction holds (SQLite has one
/// writer at a time).
pub fn attempts_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"))
}

/// How long the SIGKILL test may take before it fails.
pub const SIGKILL_DEADLINE: Duration = Duration::from_secs(240);

/// Stamps out the SQL store's tests for one database.
///
/// `$db`: the sqlx database type; `$connect`: an async fn returning `Option<Pool<$db>>` (None when
/// the server is missing: the test returns); `$dialect`: the [`Dialect`].
#[macro_export]
macro_rules! sql_store_tests {
    ($db:ty, $connect:ident, $dialect:expr) => {
        use ::std::sync::Arc;
        use ::std::sync::atomic::{AtomicU32, Ordering};
        use ::std::time::Duration;

        use ::idem_runtime::sqlx::{self, AssertSqlSafe};
        use ::idem_runtime::{
            Begin, BeginRequest, Call, Error, Key, Options, SqlStore, Store, StoreError, Token,
            run,
        };
        use $crate::sql_common::{Dialect, Rng, unique};

        const DIALECT: Dialect = $dialect;

        async fn fresh_store(table: &str) -> Option<SqlStore<$db>> {
            let pool = $connect().await?;
            let store = SqlStore::with_table(pool, table).unwrap();
            store.migrate().await.unwrap();
            Some(store)
        }

        fn req<'a>(scope: &'a str, key: &'a Key, ttl: Duration) -> BeginRequest<'a> {
            BeginRequest {
                scope,
                key,
                token: Token::generate(),
                ttl,
                fingerprint: None,
            }
        }

        async fn count(pool: &sqlx::Pool<$db>, sql: String) -> i64 {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(pool)
                .await
                .unwrap()
        }

        async fn exec(pool: &sqlx::Pool<$db>, sql: String) {
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await.unwrap();
        }

        /// The whole contract, on this database, in the default table.
        mod conformance {
            ::idem_runtime::store_conformance!({
                // The macro evaluates this inside each test: `return` skips a test whose server
                // is missing (support::server_missing has said so, or panicked under CI).
                let Some(pool) = super::$connect().await else {
                    return;
                };
                let store = ::idem_runtime::SqlStore::new(pool);
                store.migrate().await.unwrap();
                ::std::future::ready(store)
            });
        }

        /// Concurrent start-ups all succeed, and a second round changes nothing.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn migrate_is_idempotent_and_safe_concurrently() {
            let Some(pool) = $connect().await else { return };
            let table = unique("idem_mig");
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            for _round in 0..2 {
                let runs: Vec<_> = (0..6)
                    .map(|_| {
                        let s = store.clone();
                        tokio::spawn(async move { s.migrate().await })
                    })
                    .collect();
                for r in runs {
                    r.await.unwrap().unwrap();
                }
            }
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {table}_migrations")).await,
                1
            );
            let key = Key::new("k").unwrap();
            assert!(matches!(
                store.begin(&req("s", &key, Duration::from_secs(5))).await.unwrap(),
                Begin::Acquired(_)
            ));
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// Using a table nobody migrated is a typed error that says what to do.
        #[tokio::test]
        async fn missing_table_says_to_migrate() {
            let Some(pool) = $connect().await else { return };
            let store = SqlStore::with_table(pool, &unique("idem_never")).unwrap();
            let key = Key::new("k").unwrap();
            match store.begin(&req("s", &key, Duration::from_secs(5))).await {
                Err(StoreError::Unavailable(e)) => {
                    assert!(e.to_string().contains("migrate()"), "{e}")
                }
                other => panic!("expected Unavailable, got {other:?}"),
            }
        }

        /// purge deletes exactly the expired rows (released, lapsed, done past `keep`), in
        /// batches, and nothing that is alive.
        #[tokio::test]
        async fn purge_deletes_only_expired_rows_in_batches() {
            let table = unique("idem_purge");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let s = "purge";
            let long = Duration::from_secs(600);
            let mut expired = 0;
            // 23 done records whose keep has elapsed (zero: expired at once by the db's clock).
            for i in 0..23 {
                let k = Key::new(&format!("done-old-{i}")).unwrap();
                let Begin::Acquired(l) = store.begin(&req(s, &k, long)).await.unwrap() else {
                    panic!()
                };
                store.complete(s, &k, &l, b"x", Duration::ZERO).await.unwrap();
                expired += 1;
            }
            // 4 released keys.
            for i in 0..4 {
                let k = Key::new(&format!("released-{i}")).unwrap();
                let Begin::Acquired(l) = store.begin(&req(s, &k, long)).await.unwrap() else {
                    panic!()
                };
                store.release(s, &k, &l).await.unwrap();
                expired += 1;
            }
            // Alive: 5 done records kept long, 3 leases in flight.
            for i in 0..5 {
                let k = Key::new(&format!("done-new-{i}")).unwrap();
                let Begin::Acquired(l) = store.begin(&req(s, &k, long)).await.unwrap() else {
                    panic!()
                };
                store.complete(s, &k, &l, b"kept", long).await.unwrap();
            }
            for i in 0..3 {
                let k = Key::new(&format!("inflight-{i}")).unwrap();
                assert!(matches!(
                    store.begin(&req(s, &k, long)).await.unwrap(),
                    Begin::Acquired(_)
                ));
            }
            assert_eq!(store.purge(4).await.unwrap(), expired);
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {table}")).await, 8);
            assert_eq!(store.purge(4).await.unwrap(), 0);
            let k = Key::new("done-new-0").unwrap();
            assert_eq!(
                store.begin(&req(s, &k, long)).await.unwrap(),
                Begin::Completed { output: b"kept".to_vec() }
            );
            let k = Key::new("inflight-0").unwrap();
            assert!(matches!(
                store.begin(&req(s, &k, long)).await.unwrap(),
                Begin::InFlight { .. }
            ));
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// The background purger removes expired rows without being asked again.
        #[tokio::test]
        async fn purge_continuously_runs_in_the_background() {
            let table = unique("idem_bgpurge");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let k = Key::new("k").unwrap();
            let Begin::Acquired(l) = store
                .begin(&req("bg", &k, Duration::from_secs(60)))
                .await
                .unwrap()
            else {
                panic!()
            };
            store.complete("bg", &k, &l, b"x", Duration::ZERO).await.unwrap();
            let purger = tokio::spawn(store.clone().purge_continuously(Duration::from_millis(20), 100));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while count(&pool, format!("SELECT count(*) FROM {table}")).await > 0 {
                assert!(tokio::time::Instant::now() < deadline, "the purger never ran");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            purger.abort();
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// A key whose row was purged starts again with a greater fence.
        #[tokio::test]
        async fn fence_keeps_increasing_across_a_purge() {
            let table = unique("idem_fence");
            let Some(store) = fresh_store(&table).await else { return };
            let k = Key::new("k").unwrap();
            let long = Duration::from_secs(60);
            let Begin::Acquired(first) = store.begin(&req("f", &k, long)).await.unwrap() else {
                panic!()
            };
            store.complete("f", &k, &first, b"x", Duration::ZERO).await.unwrap();
            assert_eq!(store.purge(10).await.unwrap(), 1);
            let Begin::Acquired(second) = store.begin(&req("f", &k, long)).await.unwrap() else {
                panic!()
            };
            assert!(second.fence > first.fence, "{} !> {}", second.fence, first.fence);
            let pool = store.pool().clone();
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// Keys differing only in case or trailing spaces are different records (no collation
        /// folds them), and the default table is untouched by a custom one.
        #[tokio::test]
        async fn keys_compare_byte_for_byte() {
            let table = unique("idem_bytes");
            let Some(store) = fresh_store(&table).await else { return };
            let long = Duration::from_secs(60);
            for text in ["Order-1", "order-1", "order-1 ", "örder-1"] {
                let k = Key::new(text).unwrap();
                assert!(
                    matches!(store.begin(&req("b", &k, long)).await.unwrap(), Begin::Acquired(_)),
                    "{text:?} collided"
                );
            }
            let pool = store.pool().clone();
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        // ---- The transactional mode ----

        async fn business_table(pool: &sqlx::Pool<$db>) -> String {
            let t = unique("effects");
            exec(
                pool,
                format!(
                    "CREATE TABLE {t} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                    pk = DIALECT.serial_pk,
                    text = DIALECT.text
                ),
            )
            .await;
            t
        }

        fn insert_effect(t: &str) -> String {
            format!(
                "INSERT INTO {t} (msg_key, worker) VALUES ({}, {})",
                DIALECT.p(1),
                DIALECT.p(2)
            )
        }

        #[derive(Debug, ::thiserror::Error)]
        enum AppError {
            #[error(transparent)]
            Idem(#[from] Error),
            #[error(transparent)]
            Db(#[from] sqlx::Error),
            #[error("the handler failed on purpose")]
            OnPurpose,
        }

        /// The effect and the done mark commit together; duplicates replay and add nothing.
        #[tokio::test]
        async fn tx_effect_and_mark_commit_together() {
            let table = unique("idem_tx");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let insert = insert_effect(&effects);
            let opts = Options::with_scope(unique("tx-commit"));
            for _delivery in 0..3 {
                let insert = insert.clone();
                let out: Result<i64, AppError> = store
                    .run_in_tx(&opts, Call::new("m-1"), move |tx| {
                        Box::pin(async move {
                            sqlx::query(AssertSqlSafe(insert))
                                .bind("m-1")
                                .bind(7_i64)
                                .execute(&mut **tx)
                                .await?;
                            Ok(7)
                        })
                    })
                    .await;
                assert_eq!(out.unwrap(), 7);
            }
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {effects}")).await, 1);
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// A handler error rolls its writes back and frees the key: the redelivery runs.
        #[tokio::test]
        async fn tx_error_rolls_back_and_releases() {
            let table = unique("idem_txerr");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let insert = insert_effect(&effects);
            let opts = Options::with_scope(unique("tx-err"));
            let ins = insert.clone();
            let failed: Result<i64, AppError> = store
                .run_in_tx(&opts, Call::new("m-2"), move |tx| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(ins))
                            .bind("m-2")
                            .bind(1_i64)
                            .execute(&mut **tx)
                            .await?;
                        Err(AppError::OnPurpose)
                    })
                })
                .await;
            assert!(matches!(failed, Err(AppError::OnPurpose)), "{failed:?}");
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {effects}")).await, 0);
            let ok: Result<i64, AppError> = store
                .run_in_tx(&opts, Call::new("m-2"), move |tx| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(insert))
                            .bind("m-2")
                            .bind(2_i64)
                            .execute(&mut **tx)
                            .await?;
                        Ok(2)
                    })
                })
                .await;
            assert_eq!(ok.unwrap(), 2);
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {effects}")).await, 1);
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// A holder whose lease was taken over cannot write its mark in its transaction, so its
        /// effect rolls back; the new holder's record is untouched.
        #[tokio::test]
        async fn tx_stale_holder_cannot_commit() {
            let table = unique("idem_txstale");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let (s, k) = ("stale", Key::new("m-3").unwrap());
            let Begin::Acquired(old) = store
                .begin(&req(s, &k, Duration::from_millis(200)))
                .await
                .unwrap()
            else {
                panic!()
            };
            // Wait (bounded) for the old lease to lapse and be taken over.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let new = loop {
                match store.begin(&req(s, &k, Duration::from_secs(60))).await.unwrap() {
                    Begin::Acquired(l) => break l,
                    Begin::InFlight { retry_after } => {
                        assert!(tokio::time::Instant::now() < deadline);
                        tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
                    }
                    other => panic!("{other:?}"),
                }
            };
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(insert_effect(&effects)))
                .bind("m-3")
                .bind(1_i64)
                .execute(&mut *tx)
                .await
                .unwrap();
            let marked = store
                .complete_in(&mut tx, s, &k, &old, b"stale", Duration::from_secs(60))
                .await;
            assert!(matches!(marked, Err(StoreError::LeaseLost)), "{marked:?}");
            tx.rollback().await.unwrap();
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {effects}")).await, 0);
            store
                .complete(s, &k, &new, b"fresh", Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(
                store.begin(&req(s, &k, Duration::from_secs(60))).await.unwrap(),
                Begin::Completed { output: b"fresh".to_vec() }
            );
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// Many tasks deliver the same message at once: one effect row, one execution, and every
        /// caller gets the same output.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn tx_concurrent_duplicates_apply_once() {
            let table = unique("idem_txrace");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let insert = insert_effect(&effects);
            let opts = Arc::new(Options::with_scope(unique("tx-race")).wait(Duration::from_secs(30)));
            let runs = Arc::new(AtomicU32::new(0));
            let barrier = Arc::new(tokio::sync::Barrier::new(24));
            let tasks: Vec<_> = (0..24_i64)
                .map(|i| {
                    let (store, opts, runs, barrier, insert) = (
                        store.clone(),
                        opts.clone(),
                        runs.clone(),
                        barrier.clone(),
                        insert.clone(),
                    );
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store
                            .run_in_tx(&opts, Call::new("m-4"), move |tx| {
                                Box::pin(async move {
                                    runs.fetch_add(1, Ordering::SeqCst);
                                    sqlx::query(AssertSqlSafe(insert))
                                        .bind("m-4")
                                        .bind(i)
                                        .execute(&mut **tx)
                                        .await?;
                                    tokio::time::sleep(Duration::from_millis(30)).await;
                                    Ok::<_, AppError>(i)
                                })
                            })
                            .await
                    })
                })
                .collect();
            let mut outputs = Vec::new();
            for t in tasks {
                outputs.push(t.await.unwrap().unwrap());
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert!(outputs.windows(2).all(|w| w[0] == w[1]), "{outputs:?}");
            assert_eq!(count(&pool, format!("SELECT count(*) FROM {effects}")).await, 1);
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        // ---- Several OS processes ----

        const RACE_KEYS: usize = 30;
        const RACE_PROCESSES: usize = 4;

        /// Several processes run the same keys at the same time through `run` (not
        /// transactional): every key executes once in all, and every process gets that
        /// execution's output.
        #[test]
        fn processes_race_and_each_key_runs_once() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let Some(pool) = rt.block_on($connect()) else { return };
            let table = unique("idem_procs");
            let runs_table = unique("runs");
            rt.block_on(async {
                SqlStore::with_table(pool.clone(), &table).unwrap().migrate().await.unwrap();
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {runs_table} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                        pk = DIALECT.serial_pk,
                        text = DIALECT.text
                    ),
                )
                .await;
            });
            let scope = unique("procs");
            let children: Vec<_> = (0..RACE_PROCESSES)
                .map(|w| {
                    $crate::sql_common::spawn_worker(
                        "race",
                        &[table.clone(), runs_table.clone(), scope.clone(), w.to_string()],
                        true,
                    )
                })
                .collect();
            let mut outputs: Vec<Vec<String>> = Vec::new();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "a worker failed: {out:?}");
                let lines = $crate::sql_common::results(&out);
                assert_eq!(lines.len(), RACE_KEYS, "{lines:?}");
                outputs.push(lines);
            }
            for w in &outputs[1..] {
                assert_eq!(w, &outputs[0], "processes disagree on the outputs");
            }
            rt.block_on(async {
                assert_eq!(
                    count(&pool, format!("SELECT count(*) FROM {runs_table}")).await,
                    RACE_KEYS as i64,
                    "some key ran more than once"
                );
                exec(&pool, format!("DROP TABLE {runs_table}")).await;
                exec(&pool, format!("DROP TABLE {table}")).await;
                exec(&pool, format!("DROP TABLE {table}_migrations")).await;
            });
        }

        async fn race_worker(args: &[String]) {
            let (table, runs_table, scope, me) = (&args[0], &args[1], &args[2], &args[3]);
            let me: i64 = me.parse().unwrap();
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            let opts = Options::with_scope(scope.clone()).wait(Duration::from_secs(60));
            let insert = format!(
                "INSERT INTO {runs_table} (msg_key, worker) VALUES ({}, {})",
                DIALECT.p(1),
                DIALECT.p(2)
            );
            for i in 0..RACE_KEYS {
                let key = format!("k-{i}");
                let out: Result<String, AppError> = run(&store, &opts, Call::new(&key), || async {
                    // The execution is recorded outside any transaction: it counts runs.
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(&key)
                        .bind(me)
                        .execute(&pool)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    Ok(format!("{key} by {me}"))
                })
                .await;
                println!("IDEM-RESULT {}", out.unwrap());
            }
        }

        const KILL_KEYS: usize = 120;
        const KILL_COPIES: usize = 4;
        const KILL_WORKERS: usize = 4;

        /// The transactional mode under crashes: worker processes consume a stream with many
        /// duplicates and are killed with SIGKILL at random moments, then restarted, until every
        /// message is acknowledged. The business table ends with exactly one row per key.
        #[test]
        fn tx_workers_killed_at_random_apply_each_effect_once() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let Some(pool) = rt.block_on($connect()) else { return };
            let mut rng = Rng::from_env_or_time();
            let table = unique("idem_kill");
            let effects = unique("effects");
            let attempts = unique("attempts");
            let queue = unique("queue");
            rt.block_on(async {
                SqlStore::with_table(pool.clone(), &table).unwrap().migrate().await.unwrap();
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {effects} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                        pk = DIALECT.serial_pk,
                        text = DIALECT.text
                    ),
                )
                .await;
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {queue} (seq BIGINT PRIMARY KEY, msg_key {text} NOT NULL, acked SMALLINT NOT NULL)",
                        text = DIALECT.text
                    ),
                )
                .await;
                // The stream: every key several times, shuffled (duplicates near and far apart).
                let mut stream: Vec<usize> = (0..KILL_KEYS * KILL_COPIES).map(|i| i % KILL_KEYS).collect();
                rng.shuffle(&mut stream);
                let insert = format!(
                    "INSERT INTO {queue} (seq, msg_key, acked) VALUES ({}, {}, 0)",
                    DIALECT.p(1),
                    DIALECT.p(2)
                );
                for (seq, k) in stream.iter().enumerate() {
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(seq as i64)
                        .bind(format!("msg-{k}"))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            });
            let scope = unique("kill");
            let args = |w: usize, seed: u64| {
                vec![
                    table.clone(),
                    effects.clone(),
                    attempts.clone(),
                    queue.clone(),
                    scope.clone(),
                    w.to_string(),
                    seed.to_string(),
                ]
            };
            let mut workers = $crate::sql_common::Workers(
                (0..KILL_WORKERS)
                    .map(|w| $crate::sql_common::spawn_worker("sigkill", &args(w, rng.next()), false))
                    .collect(),
            );
            let started = std::time::Instant::now();
            let mut kills = 0;
            let unacked = |rt: &tokio::runtime::Runtime| {
                rt.block_on(count(&pool, format!("SELECT count(*) FROM {queue} WHERE acked = 0")))
            };
            loop {
                // Random moments: the schedule comes from the seed printed above.
                std::thread::sleep(Duration::from_millis(20 + rng.below(180)));
                let left = unacked(&rt);
                if left == 0 {
                    break;
                }
                assert!(
                    started.elapsed() < $crate::sql_common::SIGKILL_DEADLINE,
                    "{left} messages still unacknowledged"
                );
                // Kill while there is work left; past 40 kills let the workers finish.
                if kills < 40 {
                    let victim = rng.below(KILL_WORKERS as u64) as usize;
                    workers.0[victim].kill().unwrap(); // SIGKILL
                    workers.0[victim].wait().unwrap();
                    kills += 1;
                    workers.0[victim] =
                        $crate::sql_common::spawn_worker("sigkill", &args(victim, rng.next()), false);
                }
                for (w, worker) in workers.0.iter_mut().enumerate() {
                    if let Some(status) = worker.try_wait().unwrap() {
                        // It found nothing left to do; restart it if a killed peer left work.
                        assert!(status.success(), "worker {w} failed: {status}");
                        if unacked(&rt) > 0 {
                            *worker = $crate::sql_common::spawn_worker(
                                "sigkill",
                                &args(w, rng.next()),
                                false,
                            );
                        }
                    }
                }
            }
            drop(workers);
            rt.block_on(async {
                let per_key: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT msg_key, count(*) FROM {effects} GROUP BY msg_key"
                )))
                .fetch_all(&pool)
                .await
                .unwrap();
                let log = $crate::sql_common::attempts_file(&attempts);
                let ran = std::fs::read_to_string(&log).map_or(0, |s| s.lines().count());
                let _ = std::fs::remove_file(&log);
                eprintln!(
                    "{kills} workers killed; {ran} handler executions for {KILL_KEYS} keys; {} effect rows",
                    per_key.iter().map(|(_, n)| n).sum::<i64>()
                );
                assert!(kills > 0, "no worker was killed: the test proved nothing");
                let twice: Vec<_> = per_key.iter().filter(|(_, n)| *n != 1).collect();
                assert!(twice.is_empty(), "effects applied more than once: {twice:?}");
                assert_eq!(per_key.len(), KILL_KEYS, "some keys have no effect");
                for t in [&effects, &queue, &table] {
                    exec(&pool, format!("DROP TABLE {t}")).await;
                }
                exec(&pool, format!("DROP TABLE {table}_migrations")).await;
            });
        }

        async fn sigkill_worker(args: &[String]) {
            let (table, effects, attempts, queue, scope) =
                (&args[0], &args[1], &args[2], &args[3], &args[4]);
            let me: i64 = args[5].parse().unwrap();
            let mut rng = Rng::seeded(args[6].parse().unwrap());
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            // A short lease, so that the lease of a killed worker lapses soon and is taken over.
            let opts = Options::with_scope(scope.clone()).ttl(Duration::from_secs(1));
            let pick = format!(
                "SELECT seq, msg_key FROM {queue} WHERE acked = 0 AND seq >= {} ORDER BY seq LIMIT 8",
                DIALECT.p(1)
            );
            let ack = format!("UPDATE {queue} SET acked = 1 WHERE seq = {}", DIALECT.p(1));
            let attempts = $crate::sql_common::attempts_file(attempts);
            let effect = insert_effect(effects);
            let total = (KILL_KEYS * KILL_COPIES) as u64;
            loop {
                let from = rng.below(total) as i64;
                let mut batch: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(pick.clone()))
                    .bind(from)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    batch = sqlx::query_as(AssertSqlSafe(pick.clone()))
                        .bind(0_i64)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                }
                if batch.is_empty() {
                    return; // everything is acknowledged
                }
                for (seq, key) in batch {
                    let pause = Duration::from_millis(rng.below(40));
                    let (attempts, effect, k) = (attempts.clone(), effect.clone(), key.clone());
                    let out: Result<i64, AppError> = store
                        .run_in_tx(&opts, Call::new(&key), move |tx| {
                            Box::pin(async move {
                                // Counted outside the transaction: every execution, even the
                                // ones a kill rolls back.
                                $crate::sql_common::append_line(&attempts, &format!("{k} {me}"));
                                sqlx::query(AssertSqlSafe(effect))
                                    .bind(&k)
                                    .bind(me)
                                    .execute(&mut **tx)
                                    .await?;
                                // Widen the window in which a kill lands mid-transaction.
                                tokio::time::sleep(pause).await;
                                Ok(me)
                            })
                        })
                        .await;
                    // Done now or before: acknowledge (a kill right here redelivers: a replay).
                    // In flight elsewhere, lease lost, database busy: leave it for later.
                    if out.is_ok() {
                        sqlx::query(AssertSqlSafe(ack.clone()))
                            .bind(seq)
                            .execute(&pool)
                            .await
                            .unwrap();
                    }
                }
            }
        }

        /// The entry point of the worker processes the multi-process tests start. In a normal
        /// test run it does nothing.
        #[test]
        fn worker_process() {
            let Some((role, args)) = $crate::sql_common::worker_role() else {
                return;
            };
            let rt = tokio::runtime::Runtime::new().unwrap();
            match role.as_str() {
                "race" => rt.block_on(race_worker(&args)),
                "sigkill" => rt.block_on(sigkill_worker(&args)),
                other => panic!("unknown worker role {other}"),
            }
        }
    };
}
