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

/// What a duplicate gets when it arrives while the first holder's transaction is still open (the
/// transactional attribute, where the caller begins and commits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dup {
    /// [`idem_runtime::Error::InFlight`] at once, while the holder runs.
    InFlight,
    /// It waits for the holder's transaction to end (a database lock), then replays its output.
    WaitsThenReplays,
    /// The database refuses its claim at once, while the holder runs
    /// ([`idem_runtime::Error::Unavailable`] in the begin phase): SQLite does not wait (no busy
    /// handler) when a transaction that has read tries to write while another one holds the
    /// write lock, because its snapshot would be stale by the time it got the lock.
    Busy,
}

/// How a caller begins its transaction, and what a duplicate of a long handler gets under it.
#[derive(Debug)]
pub struct TxMode {
    pub name: &'static str,
    /// Statements run on the connection just before the transaction begins.
    pub setup: &'static [&'static str],
    /// The statement that begins it (`None`: sqlx's `BEGIN`).
    pub begin: Option<&'static str>,
    /// The caller reads the business table before it calls the handler, so its snapshot (and, at
    /// SERIALIZABLE on MariaDB, its share locks) predate the claim.
    pub read_first: bool,
    /// What a duplicate arriving mid-handler gets.
    pub dup: Dup,
}

/// The ways of beginning a transaction the long-handler test runs on each database (named by
/// sqlx's `Database::NAME`).
pub fn tx_modes(db: &str) -> &'static [TxMode] {
    match db {
        // The claim is a transaction-scoped advisory lock tried without waiting: a second
        // transaction is refused at once, whatever the isolation level.
        "PostgreSQL" => &[
            TxMode {
                name: "read_committed",
                setup: &[],
                begin: Some("BEGIN ISOLATION LEVEL READ COMMITTED"),
                read_first: true,
                dup: Dup::InFlight,
            },
            TxMode {
                name: "repeatable_read",
                setup: &[],
                begin: Some("BEGIN ISOLATION LEVEL REPEATABLE READ"),
                read_first: true,
                dup: Dup::InFlight,
            },
            TxMode {
                name: "serializable",
                setup: &[],
                begin: Some("BEGIN ISOLATION LEVEL SERIALIZABLE"),
                read_first: true,
                dup: Dup::InFlight,
            },
        ],
        // The claim is a lease on another connection: refused at once while it is renewed. At
        // SERIALIZABLE the duplicate's read is a locking read, which waits for the holder's
        // uncommitted effect row: it gets past it only once the holder committed, and replays.
        "MySQL" => &[
            TxMode {
                name: "repeatable_read",
                setup: &[],
                begin: None,
                read_first: true,
                dup: Dup::InFlight,
            },
            TxMode {
                name: "serializable",
                setup: &["SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"],
                begin: None,
                read_first: true,
                dup: Dup::WaitsThenReplays,
            },
        ],
        // The claim is a write, under SQLite's one write lock, which the holder keeps until it
        // ends. A duplicate whose first statement is a write waits for it (busy_timeout), at its
        // `BEGIN IMMEDIATE` or at the claim, and then replays. One that read first (a deferred
        // BEGIN) is refused at once: SQLite cannot upgrade its read snapshot to a write while
        // another connection writes (SQLITE_BUSY without calling the busy handler).
        "SQLite" => &[
            TxMode {
                name: "deferred_read_first",
                setup: &[],
                begin: None,
                read_first: true,
                dup: Dup::Busy,
            },
            TxMode {
                name: "deferred_claim_first",
                setup: &[],
                begin: None,
                read_first: false,
                dup: Dup::WaitsThenReplays,
            },
            TxMode {
                name: "immediate",
                setup: &[],
                begin: Some("BEGIN IMMEDIATE"),
                read_first: true,
                dup: Dup::WaitsThenReplays,
            },
        ],
        other => panic!("no transaction modes for {other}"),
    }
}

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

        // ---- The transactional attribute: the caller begins and commits ----

        /// The database, by sqlx's name for it: "PostgreSQL", "MySQL" (MariaDB too), "SQLite".
        fn db_name() -> &'static str {
            <$db as sqlx::Database>::NAME
        }

        /// Whether the claim is made in the caller's transaction (PostgreSQL, SQLite), or as a
        /// lease on another connection that idem renews (MySQL/MariaDB).
        fn claims_in_tx() -> bool {
            db_name() != "MySQL"
        }

        /// The business table's rows, in insertion order: (message key, worker).
        async fn effect_rows(pool: &sqlx::Pool<$db>, effects: &str) -> Vec<(String, i64)> {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT msg_key, worker FROM {effects} ORDER BY id"
            )))
            .fetch_all(pool)
            .await
            .unwrap()
        }

        async fn drop_tables(pool: &sqlx::Pool<$db>, idem_table: &str, effects: &str) {
            for t in [effects, idem_table, &format!("{idem_table}_migrations")] {
                exec(pool, format!("DROP TABLE {t}")).await;
            }
        }

        /// Begin a transaction the way `mode` says, on `conn`.
        async fn begin_mode<'c>(
            conn: &'c mut <$db as sqlx::Database>::Connection,
            mode: &$crate::sql_common::TxMode,
            effects: &str,
        ) -> sqlx::Transaction<'c, $db> {
            for statement in mode.setup {
                sqlx::raw_sql(*statement).execute(&mut *conn).await.unwrap();
            }
            let mut tx = match mode.begin {
                Some(begin) => sqlx::Connection::begin_with(conn, begin).await,
                None => sqlx::Connection::begin(conn).await,
            }
            .unwrap();
            if mode.read_first {
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                    "SELECT count(*) FROM {effects}"
                )))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            }
            tx
        }

        /// One delivery: the effect row, in the caller's transaction; returns the worker that ran.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_attr",
            ttl = "1s"
        )]
        async fn tx_apply(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            Ok(worker)
        }

        /// Holds a handler inside its body (after its write) until the test lets it go.
        struct Hold {
            started: tokio::sync::oneshot::Sender<::idem_runtime::CurrentLease>,
            release: tokio::sync::oneshot::Receiver<()>,
        }

        /// A handler with a short lease renewed for one second at most (`max_lease`): held past
        /// that, a lease on another connection lapses.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_held",
            ttl = "300ms",
            max_lease = "1s"
        )]
        async fn tx_apply_held(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
            hold: Option<Hold>,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            if let Some(hold) = hold {
                let lease = ::idem_runtime::current_lease().expect("inside the handler");
                let _ = hold.started.send(lease);
                let _ = hold.release.await;
            }
            Ok(worker)
        }

        /// The lease of `tx_apply_long`.
        const LONG_TTL: Duration = Duration::from_millis(300);

        /// Steers a long handler: it says when it is two ttls in, and may wait there for the
        /// test's duplicate to be answered before its last ttl.
        struct Long {
            halfway: tokio::sync::oneshot::Sender<()>,
            dup_answered: Option<tokio::sync::oneshot::Receiver<()>>,
        }

        /// A handler that runs for three times its ttl (`LONG_TTL`, renewed all along).
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_long",
            ttl = "300ms"
        )]
        async fn tx_apply_long(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
            script: Option<Long>,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            if let Some(script) = script {
                // The workload: three ttls in all.
                tokio::time::sleep(2 * LONG_TTL).await;
                let _ = script.halfway.send(());
                if let Some(answered) = script.dup_answered {
                    let _ = answered.await;
                }
                tokio::time::sleep(LONG_TTL).await;
            }
            Ok(worker)
        }

        /// Through the attribute, the caller committing: three deliveries leave one effect row
        /// and all get the first one's output.
        #[tokio::test]
        async fn tx_attr_effect_and_mark_commit_together() {
            let table = unique("idem_txa");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut outputs = Vec::new();
            for worker in 1..=3_i64 {
                let mut tx = pool.begin().await.unwrap();
                let out = tx_apply(&store, &mut tx, "m-1".into(), &effects, worker).await;
                tx.commit().await.unwrap();
                outputs.push(out.unwrap());
            }
            assert_eq!(outputs, [1, 1, 1], "the 2nd and 3rd deliveries must replay the 1st");
            assert_eq!(effect_rows(&pool, &effects).await, [("m-1".to_owned(), 1)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// The caller rolls back after the handler returned Ok: the effect and the mark are gone
        /// together, and the key is free again (PostgreSQL, SQLite: at once, the claim was in the
        /// transaction; MySQL/MariaDB: when the lease lapses, within its ttl), so a redelivery
        /// runs and commits.
        #[tokio::test]
        async fn tx_attr_caller_rollback_after_ok_frees_the_key() {
            let table = unique("idem_txa_rb");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let first = tx_apply(&store, &mut tx, "m-2".into(), &effects, 1).await;
            assert_eq!(first.unwrap(), 1);
            tx.rollback().await.unwrap();
            let rolled_back = tokio::time::Instant::now();
            assert_eq!(effect_rows(&pool, &effects).await, []);
            // tx_apply's ttl is 1 s; the margin is for the database's round trips.
            let deadline = rolled_back + Duration::from_secs(2);
            let mut refused = 0;
            let ran = loop {
                let mut tx = pool.begin().await.unwrap();
                match tx_apply(&store, &mut tx, "m-2".into(), &effects, 2).await {
                    Ok(worker) => {
                        tx.commit().await.unwrap();
                        break worker;
                    }
                    Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
                        tx.rollback().await.unwrap();
                        assert!(
                            !claims_in_tx(),
                            "{}: the rollback did not free the key at once",
                            db_name()
                        );
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the key was still in flight 2 s after the rollback (ttl 1 s)"
                        );
                        refused += 1;
                        // Waiting for the lease to lapse: time itself, nothing signals it.
                        tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            };
            eprintln!(
                "{}: the redelivery ran {:?} after the rollback ({refused} refused before)",
                db_name(),
                rolled_back.elapsed()
            );
            assert_eq!(ran, 2, "the redelivery must run, not replay the rolled-back output");
            assert_eq!(effect_rows(&pool, &effects).await, [("m-2".to_owned(), 2)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// A holder held past its `max_lease` and ttl. MySQL/MariaDB: its lease lapses and a
        /// duplicate takes the key over and commits; the late holder gets `LeaseLost`, its
        /// transaction is rolled back under it, and even its caller's `commit` then commits
        /// nothing: one effect row, the duplicate's. PostgreSQL, SQLite: the claim is the open
        /// transaction itself, so there is no takeover however long it stays open (PostgreSQL:
        /// the duplicate is refused at once; SQLite: it cannot get the write lock), and the holder
        /// commits.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tx_attr_stale_holder_can_never_commit() {
            let table = unique("idem_txa_stale");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let (release, release_rx) = tokio::sync::oneshot::channel();
            let holder = {
                let (store, pool, effects) = (store.clone(), pool.clone(), effects.clone());
                let hold = Hold {
                    started: started_tx,
                    release: release_rx,
                };
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    let out =
                        tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 1, Some(hold)).await;
                    (out, tx)
                })
            };
            let lease = started.await.expect("the holder's handler started");

            if claims_in_tx() {
                // Past max_lease (1 s) and a ttl (300 ms) beyond it: a lease would have lapsed
                // by now. Nothing signals that (no lease is renewed here): time itself.
                tokio::time::sleep(Duration::from_millis(1000 + 300 + 300)).await;
                assert!(!lease.is_lost(), "the transaction's claim cannot be lost");
                // A duplicate on a connection of its own; SQLite's waits 100 ms for the lock.
                let mut conn = pool.acquire().await.unwrap().detach();
                if db_name() == "SQLite" {
                    sqlx::raw_sql("PRAGMA busy_timeout = 100")
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
                let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
                let dup = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 2, None).await;
                if db_name() == "SQLite" {
                    assert!(
                        matches!(
                            dup,
                            Err(AppError::Idem(Error::Unavailable {
                                phase: ::idem_runtime::Phase::Begin,
                                ..
                            }))
                        ),
                        "the duplicate got past the holder's write lock: {dup:?}"
                    );
                } else {
                    assert!(
                        matches!(dup, Err(AppError::Idem(Error::InFlight { .. }))),
                        "the duplicate was not refused while the holder's transaction is open: \
                         {dup:?}"
                    );
                }
                tx.rollback().await.unwrap();
                drop(conn);
                release.send(()).unwrap();
                let (out, tx) = holder.await.unwrap();
                assert_eq!(out.unwrap(), 1, "the holder lost a claim it cannot lose");
                tx.commit().await.unwrap();
                // After the holder's commit a duplicate replays its output.
                let mut tx = pool.begin().await.unwrap();
                let again = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 3, None).await;
                tx.commit().await.unwrap();
                assert_eq!(again.unwrap(), 1);
                assert_eq!(effect_rows(&pool, &effects).await, [("m-3".to_owned(), 1)]);
            } else {
                // The watchdog stops renewing at max_lease and says so; the lease lapses a ttl
                // later, and the duplicate takes the key over as soon as it has.
                lease.lost().await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                let mut tx = pool.begin().await.unwrap();
                let took_over = loop {
                    match tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 2, None).await {
                        Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "the lapsed lease was never taken over"
                            );
                            // Waiting for the lease to lapse: time itself.
                            tokio::time::sleep(retry_after.min(Duration::from_millis(20))).await;
                        }
                        other => break other,
                    }
                };
                assert_eq!(took_over.unwrap(), 2, "the duplicate must run, not replay");
                tx.commit().await.unwrap();
                release.send(()).unwrap();
                let (out, mut tx) = holder.await.unwrap();
                assert!(
                    matches!(out, Err(AppError::Idem(Error::LeaseLost { .. }))),
                    "the stale holder's mark was not refused: {out:?}"
                );
                // idem rolled the holder's transaction back and left a read-only one: a write
                // the caller still makes fails, and its commit commits nothing.
                let late = sqlx::query(AssertSqlSafe(insert_effect(&effects)))
                    .bind("m-3")
                    .bind(1_i64)
                    .execute(&mut *tx)
                    .await;
                assert!(late.is_err(), "a write after LeaseLost was accepted");
                let committed = tx.commit().await;
                eprintln!("the stale holder's commit after LeaseLost: {committed:?}");
                assert_eq!(
                    effect_rows(&pool, &effects).await,
                    [("m-3".to_owned(), 2)],
                    "the stale holder's effect was committed"
                );
                // And the key is B's: a duplicate replays B's output.
                let mut tx = pool.begin().await.unwrap();
                let again = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 3, None).await;
                tx.commit().await.unwrap();
                assert_eq!(again.unwrap(), 2);
            }
            drop_tables(&pool, &table, &effects).await;
        }

        /// A handler that runs for three ttls, at each isolation level (and SQLite's BEGIN
        /// kinds), with the callers reading before they call: a duplicate arriving two ttls in
        /// does not run (it is refused, or waits for the holder and replays, or waits and fails
        /// as the database requires; see `sql_common::tx_modes`), the holder commits, and a
        /// later delivery replays. One effect row per mode, the holder's.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn tx_attr_isolation_levels_and_long_handlers() {
            use $crate::sql_common::Dup;
            let table = unique("idem_txa_iso");
            let Some(store) = fresh_store(&table).await else { return };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let modes = $crate::sql_common::tx_modes(db_name());
            for mode in modes {
                let key = format!("m-4-{}", mode.name);
                let (halfway_tx, halfway) = tokio::sync::oneshot::channel();
                let (answered, answered_rx) = tokio::sync::oneshot::channel();
                // A duplicate that is answered while the holder runs: the holder waits for that
                // answer before its last ttl, so the answer is sure to come while it is open.
                let answered_at_once = matches!(mode.dup, Dup::InFlight | Dup::Busy);
                let script = Long {
                    halfway: halfway_tx,
                    dup_answered: answered_at_once.then_some(answered_rx),
                };
                let call = |worker: i64, script: Option<Long>| {
                    let (store, pool, effects, key) =
                        (store.clone(), pool.clone(), effects.clone(), key.clone());
                    tokio::spawn(async move {
                        let mut conn = pool.acquire().await.unwrap();
                        let mut tx = begin_mode(&mut conn, mode, &effects).await;
                        let out =
                            tx_apply_long(&store, &mut tx, key, &effects, worker, script).await;
                        let ending = tokio::time::Instant::now();
                        if out.is_ok() {
                            tx.commit().await.unwrap();
                        } else {
                            tx.rollback().await.unwrap();
                        }
                        (out, ending)
                    })
                };
                let started = tokio::time::Instant::now();
                let holder = call(1, Some(script));
                halfway.await.expect("the holder's handler is two ttls in");
                let dup = call(2, None);
                let (dup_out, dup) = if answered_at_once {
                    // At once: not after a lock wait (SQLite's busy_timeout is 30 s, InnoDB's
                    // lock wait 50 s), while the holder waits for this answer.
                    let answer = tokio::time::timeout(Duration::from_secs(1), dup).await;
                    let Ok(joined) = answer else {
                        panic!("{}: the duplicate was not answered at once", mode.name)
                    };
                    let (out, _) = joined.unwrap();
                    answered.send(()).unwrap();
                    (Some(out), None)
                } else {
                    (None, Some(dup))
                };
                let (out, holder_commits) = holder.await.unwrap();
                assert_eq!(out.unwrap(), 1, "{}: the holder failed", mode.name);
                assert!(started.elapsed() >= 3 * LONG_TTL);
                match (mode.dup, dup_out) {
                    (Dup::InFlight, Some(out)) => assert!(
                        matches!(out, Err(AppError::Idem(Error::InFlight { .. }))),
                        "{}: the duplicate was not refused: {out:?}",
                        mode.name
                    ),
                    (Dup::Busy, Some(out)) => assert!(
                        matches!(
                            out,
                            Err(AppError::Idem(Error::Unavailable {
                                phase: ::idem_runtime::Phase::Begin,
                                ..
                            }))
                        ),
                        "{}: the duplicate's claim was not refused by the database: {out:?}",
                        mode.name
                    ),
                    (Dup::WaitsThenReplays, None) => {
                        let (out, answered_at) = dup.unwrap().await.unwrap();
                        assert_eq!(
                            out.unwrap(),
                            1,
                            "{}: the duplicate did not replay the holder's output",
                            mode.name
                        );
                        // It could only see the mark once the holder began committing.
                        assert!(answered_at > holder_commits, "{}", mode.name);
                    }
                    _ => unreachable!(),
                }
                // A later delivery, begun the same way, replays.
                let (out, _) = call(3, None).await.unwrap();
                assert_eq!(out.unwrap(), 1, "{}: the redelivery did not replay", mode.name);
            }
            let expected: Vec<(String, i64)> =
                modes.iter().map(|m| (format!("m-4-{}", m.name), 1)).collect();
            assert_eq!(effect_rows(&pool, &effects).await, expected);
            drop_tables(&pool, &table, &effects).await;
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
            kill_workers_at_random("sigkill");
        }

        /// The same through the attribute, where the caller begins and commits the transaction:
        /// kills land before, inside and after the handler, between its return and the caller's
        /// commit, and between that commit and the acknowledgement.
        #[test]
        fn tx_attr_workers_killed_at_random_apply_each_effect_once() {
            kill_workers_at_random("sigkill_attr");
        }

        /// Run the SIGKILL test with workers of `role` ("sigkill": `run_in_tx`; "sigkill_attr":
        /// the attribute).
        fn kill_workers_at_random(role: &str) {
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
                    .map(|w| $crate::sql_common::spawn_worker(role, &args(w, rng.next()), false))
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
                        $crate::sql_common::spawn_worker(role, &args(victim, rng.next()), false);
                }
                for (w, worker) in workers.0.iter_mut().enumerate() {
                    if let Some(status) = worker.try_wait().unwrap() {
                        // It found nothing left to do; restart it if a killed peer left work.
                        assert!(status.success(), "worker {w} failed: {status}");
                        if unacked(&rt) > 0 {
                            *worker =
                                $crate::sql_common::spawn_worker(role, &args(w, rng.next()), false);
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

        /// The attribute's form of `sigkill_worker`'s handler.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.kill_attr",
            ttl = "1s"
        )]
        async fn kill_apply(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            attempts: &std::path::Path,
            me: i64,
            pause: Duration,
        ) -> Result<i64, AppError> {
            // Counted outside the transaction: every execution, even the ones a kill rolls back.
            $crate::sql_common::append_line(attempts, &format!("{key} {me}"));
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(me)
                .execute(&mut **tx)
                .await?;
            // Widen the window in which a kill lands mid-transaction.
            tokio::time::sleep(pause).await;
            Ok(me)
        }

        /// `sigkill_worker` through the attribute: the worker begins the transaction, calls the
        /// handler, commits, then acknowledges. (Its scope is fixed; the idem table is the run's.)
        async fn sigkill_attr_worker(args: &[String]) {
            let (table, effects, attempts, queue) = (&args[0], &args[1], &args[2], &args[3]);
            let me: i64 = args[5].parse().unwrap();
            let mut rng = Rng::seeded(args[6].parse().unwrap());
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            let pick = format!(
                "SELECT seq, msg_key FROM {queue} WHERE acked = 0 AND seq >= {} ORDER BY seq LIMIT 8",
                DIALECT.p(1)
            );
            let ack = format!("UPDATE {queue} SET acked = 1 WHERE seq = {}", DIALECT.p(1));
            let attempts = $crate::sql_common::attempts_file(attempts);
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
                    let mut tx = pool.begin().await.unwrap();
                    let out = kill_apply(&store, &mut tx, key, effects, &attempts, me, pause).await;
                    // The caller commits; a kill before it rolls everything back.
                    let committed = match out {
                        Ok(_) => tx.commit().await.is_ok(),
                        Err(_) => {
                            let _ = tx.rollback().await;
                            false
                        }
                    };
                    // Done now or before: acknowledge (a kill right here redelivers: a replay).
                    // In flight elsewhere, lease lost, database busy: leave it for later.
                    if committed {
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
                "sigkill_attr" => rt.block_on(sigkill_attr_worker(&args)),
                other => panic!("unknown worker role {other}"),
            }
        }
    };
}
