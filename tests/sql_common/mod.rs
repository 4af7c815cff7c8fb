//! Tests shared by the SQL store's backends (`tests/sql_postgres.rs`, `sql_mysql.rs`,
//! `sql_sqlite.rs`): `sql_store_tests!` stamps them out for one database, so every body is
//! concrete sqlx code.
//!
//! The multi-process tests re-run the test binary itself as worker processes
//! (`<binary> --exact worker_process`, with `IDEM_SQL_WORKER` set); in a normal run
//! `worker_process` returns at once.
#![allow(dead_code, unreachable_pub)]

mod processes;
mod regressions;
mod review_tx;
mod tx_attr;

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
            Begin, BeginRequest, Call, Error, Key, Options, SqlStore, Store, StoreError, Token, run,
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
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(pool)
                .await
                .unwrap();
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

        /// The operations (inspect, list, counts, forget, release_stuck), on this database.
        mod operations {
            ::idem_runtime::operations_conformance!({
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
            // One row per version shipped (1: the table; 2: the holder's columns).
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {table}_migrations")).await,
                2
            );
            let key = Key::new("k").unwrap();
            assert!(matches!(
                store
                    .begin(&req("s", &key, Duration::from_secs(5)))
                    .await
                    .unwrap(),
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
            let Some(store) = fresh_store(&table).await else {
                return;
            };
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
                store
                    .complete(s, &k, &l, b"x", Duration::ZERO)
                    .await
                    .unwrap();
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {table}")).await,
                8
            );
            assert_eq!(store.purge(4).await.unwrap(), 0);
            let k = Key::new("done-new-0").unwrap();
            assert_eq!(
                store.begin(&req(s, &k, long)).await.unwrap(),
                Begin::Completed {
                    output: b"kept".to_vec(),
                    fingerprint: None,
                }
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
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let k = Key::new("k").unwrap();
            let Begin::Acquired(l) = store
                .begin(&req("bg", &k, Duration::from_secs(60)))
                .await
                .unwrap()
            else {
                panic!()
            };
            store
                .complete("bg", &k, &l, b"x", Duration::ZERO)
                .await
                .unwrap();
            let purger = tokio::spawn(
                store
                    .clone()
                    .purge_continuously(Duration::from_millis(20), 100),
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while count(&pool, format!("SELECT count(*) FROM {table}")).await > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the purger never ran"
                );
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
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let k = Key::new("k").unwrap();
            let long = Duration::from_secs(60);
            let Begin::Acquired(first) = store.begin(&req("f", &k, long)).await.unwrap() else {
                panic!()
            };
            store
                .complete("f", &k, &first, b"x", Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(store.purge(10).await.unwrap(), 1);
            let Begin::Acquired(second) = store.begin(&req("f", &k, long)).await.unwrap() else {
                panic!()
            };
            assert!(
                second.fence > first.fence,
                "{} !> {}",
                second.fence,
                first.fence
            );
            let pool = store.pool().clone();
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// Keys differing only in case or trailing spaces are different records (no collation
        /// folds them), and the default table is untouched by a custom one.
        #[tokio::test]
        async fn keys_compare_byte_for_byte() {
            let table = unique("idem_bytes");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let long = Duration::from_secs(60);
            for text in ["Order-1", "order-1", "order-1 ", "örder-1"] {
                let k = Key::new(text).unwrap();
                assert!(
                    matches!(
                        store.begin(&req("b", &k, long)).await.unwrap(),
                        Begin::Acquired(_)
                    ),
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
            let Some(store) = fresh_store(&table).await else {
                return;
            };
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {effects}")).await,
                1
            );
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// A handler error rolls its writes back and frees the key: the redelivery runs.
        #[tokio::test]
        async fn tx_error_rolls_back_and_releases() {
            let table = unique("idem_txerr");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {effects}")).await,
                0
            );
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {effects}")).await,
                1
            );
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// A holder whose lease was taken over cannot write its mark in its transaction, so its
        /// effect rolls back; the new holder's record is untouched.
        #[tokio::test]
        async fn tx_stale_holder_cannot_commit() {
            let table = unique("idem_txstale");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
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
                match store
                    .begin(&req(s, &k, Duration::from_secs(60)))
                    .await
                    .unwrap()
                {
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {effects}")).await,
                0
            );
            store
                .complete(s, &k, &new, b"fresh", Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(
                store
                    .begin(&req(s, &k, Duration::from_secs(60)))
                    .await
                    .unwrap(),
                Begin::Completed {
                    output: b"fresh".to_vec(),
                    fingerprint: None,
                }
            );
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        /// Many tasks deliver the same message at once: one effect row, one execution, and every
        /// caller gets the same output.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn tx_concurrent_duplicates_apply_once() {
            let table = unique("idem_txrace");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let insert = insert_effect(&effects);
            let opts =
                Arc::new(Options::with_scope(unique("tx-race")).wait(Duration::from_secs(30)));
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
            assert_eq!(
                count(&pool, format!("SELECT count(*) FROM {effects}")).await,
                1
            );
            exec(&pool, format!("DROP TABLE {effects}")).await;
        }

        $crate::sql_tx_attr_tests!($db, $connect);
        $crate::sql_process_tests!($db, $connect);
        $crate::sql_regression_tests!($db, $connect);
        $crate::sql_review_tx_tests!($db, $connect);
    };
}
