//! The transactional attribute (`#[idempotent(tx = "...")]`, the caller commits) through the
//! layered store: Redis in front (`REDIS_URL`, default `redis://127.0.0.1:6379`) of the SQL store
//! on PostgreSQL (`POSTGRES_URL`), MySQL/MariaDB (`MYSQL_URL`) and SQLite (a file under target/).
//! Skipped loudly without a server, failed under CI.
//!
//! Until the caller has committed, the front cannot know the key is done: it answers duplicates
//! "in flight" for up to a second after the handler returned, then the database answers (and
//! backfills the front). The duplicates below retry past that window, within a bounded deadline.
mod redis_support;
mod sql_common;
mod support;

use std::time::Duration;

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Error, Key, LayeredStore, RedisStore, SqlStore};
use sql_common::{Dialect, unique};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// How long a committed key may be answered "in flight" before the front settles (one second),
/// with room for the round trips.
const SETTLE_DEADLINE: Duration = Duration::from_secs(3);

macro_rules! layered_tx_tests {
    ($db:ty, $connect:ident, $dialect:expr) => {
        use super::*;

        type Layered = LayeredStore<RedisStore, SqlStore<$db>>;

        const DIALECT: Dialect = $dialect;

        /// The layered store over a fresh idem table, a business table of effects (one row per
        /// execution that committed: no unique key on purpose), and a prefix that makes this
        /// run's message keys unique (the shared Redis keeps records across runs, and the
        /// attribute's scope is fixed).
        struct World {
            store: Layered,
            /// A plain connection to the same Redis, to look at the front's records.
            admin: idem_runtime::redis::aio::MultiplexedConnection,
            pool: sqlx::Pool<$db>,
            table: String,
            effects: String,
            run: String,
        }

        impl World {
            async fn start() -> Option<World> {
                let pool = $connect().await?;
                // `RedisStore::from_url` connects lazily (it does not fail while Redis is down,
                // and the layered store would then quietly run on the database alone): a real
                // connection first, so a missing Redis is reported (a failure under CI).
                let admin = redis_support::shared_conn().await?;
                let front = redis_support::shared_store().await?;
                let table = unique("idem_ltx");
                let durable = SqlStore::with_table(pool.clone(), &table).unwrap();
                durable.migrate().await.unwrap();
                let effects = unique("ltx_effects");
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE {effects} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                    pk = DIALECT.serial_pk,
                    text = DIALECT.text
                )))
                .execute(&pool)
                .await
                .unwrap();
                Some(World {
                    store: LayeredStore::new(front, durable),
                    admin,
                    pool,
                    table,
                    effects,
                    run: unique("run"),
                })
            }

            fn key(&self, name: &str) -> String {
                format!("{}:{name}", self.run)
            }

            /// The business table's rows, in insertion order: (message key, worker).
            async fn rows(&self) -> Vec<(String, i64)> {
                sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT msg_key, worker FROM {} ORDER BY id",
                    self.effects
                )))
                .fetch_all(&self.pool)
                .await
                .unwrap()
            }

            /// One delivery by `worker`: begin, call, commit when it returned Ok (roll back
            /// otherwise).
            async fn deliver(&self, key: &str, worker: i64) -> Result<i64, AppError> {
                let mut tx = self.pool.begin().await.unwrap();
                let out = apply(&self.store, &mut tx, key.to_owned(), &self.effects, worker).await;
                if out.is_ok() {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
                out
            }

            /// Deliver until the answer is not `InFlight` (the front settling, or a lease
            /// lapsing), within `SETTLE_DEADLINE`; returns the answer and how many deliveries
            /// were refused before it.
            async fn deliver_past_in_flight(
                &self,
                key: &str,
                worker: i64,
            ) -> (Result<i64, AppError>, u32) {
                let deadline = Instant::now() + SETTLE_DEADLINE;
                let mut refused = 0;
                loop {
                    match self.deliver(key, worker).await {
                        Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
                            assert!(
                                Instant::now() < deadline,
                                "{key} still in flight after {SETTLE_DEADLINE:?}"
                            );
                            refused += 1;
                            // The front's claim lapses by time: nothing signals it.
                            tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
                        }
                        other => return (other, refused),
                    }
                }
            }

            /// The front's state for `key`: `I` in flight, `F` released, `D` done; `None` absent.
            async fn front_tag(&mut self, key: &str) -> Option<u8> {
                let record = self
                    .store
                    .front()
                    .record_key("tests.layered_tx", &Key::new(key).unwrap());
                let value: Option<Vec<u8>> = idem_runtime::redis::cmd("GET")
                    .arg(&record)
                    .query_async(&mut self.admin)
                    .await
                    .unwrap();
                value.and_then(|v| v.first().copied())
            }

            /// Every call went through the front (none answered by the database alone), then
            /// the tables go.
            async fn finish(self) {
                assert_eq!(
                    self.store.degraded_calls(),
                    0,
                    "the front was skipped: the test ran on the database alone"
                );
                for t in [
                    self.effects.clone(),
                    self.table.clone(),
                    format!("{}_migrations", self.table),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {t}")))
                        .execute(&self.pool)
                        .await
                        .unwrap();
                }
            }
        }

        /// One delivery: the effect row, in the caller's transaction; returns the worker that
        /// ran.
        #[idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.layered_tx",
            ttl = "1s",
            keep = "60s"
        )]
        async fn apply(
            store: &Layered,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {effects} (msg_key, worker) VALUES ({}, {})",
                DIALECT.p(1),
                DIALECT.p(2)
            )))
            .bind(&key)
            .bind(worker)
            .execute(&mut **tx)
            .await?;
            Ok(worker)
        }

        /// Three deliveries, each committed by its caller: one effect row, and every delivery
        /// gets the first one's output.
        #[tokio::test]
        async fn tx_attr_effect_and_mark_commit_together() {
            let Some(w) = World::start().await else { return };
            let key = w.key("m-1");
            assert_eq!(w.deliver(&key, 1).await.unwrap(), 1);
            for worker in 2..=3 {
                let (out, _) = w.deliver_past_in_flight(&key, worker).await;
                assert_eq!(out.unwrap(), 1, "delivery {worker} did not replay the first");
            }
            assert_eq!(w.rows().await, [(key, 1)]);
            w.finish().await;
        }

        /// The caller rolls back after the handler returned Ok: nothing is left of the effect,
        /// and the key frees (the front's claim after its one-second settle; MySQL/MariaDB's
        /// lease after its ttl), so a redelivery runs and commits.
        #[tokio::test]
        async fn tx_attr_caller_rollback_after_ok_frees_the_key() {
            let Some(w) = World::start().await else { return };
            let key = w.key("m-2");
            let mut tx = w.pool.begin().await.unwrap();
            let first = apply(&w.store, &mut tx, key.clone(), &w.effects, 1).await;
            assert_eq!(first.unwrap(), 1);
            tx.rollback().await.unwrap();
            assert_eq!(w.rows().await, []);
            let (out, refused) = w.deliver_past_in_flight(&key, 2).await;
            eprintln!("the redelivery ran after {refused} refusals");
            assert_eq!(out.unwrap(), 2, "the redelivery must run, not replay");
            assert_eq!(w.rows().await, [(key, 2)]);
            w.finish().await;
        }

        /// `apply` with a fingerprint over the worker's payload (`amount`).
        #[idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.layered_tx.fp",
            ttl = "1s",
            keep = "60s",
            fingerprint = "amount"
        )]
        async fn apply_fp(
            store: &Layered,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
            amount: u32,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {effects} (msg_key, worker) VALUES ({}, {})",
                DIALECT.p(1),
                DIALECT.p(2)
            )))
            .bind(&key)
            .bind(worker)
            .execute(&mut **tx)
            .await?;
            Ok(worker)
        }

        /// Review finding: a second call of one key in one transaction (a batch that holds a
        /// producer retry), after the front's settle claim had lapsed, was answered "done" by the
        /// database claim made inside the transaction (its own uncommitted mark), and the layered
        /// store copied that into Redis: with a fingerprint, Redis held a done record although
        /// nothing committed, and after the batch rolled back the redelivery was answered from
        /// Redis and never ran (the message was lost); without one, the backfill's check waited
        /// on another connection for the caller's own open transaction, forever. Nothing read
        /// inside the transaction may reach the front before it commits.
        #[tokio::test]
        async fn a_second_call_in_one_transaction_never_copies_an_uncommitted_mark_to_the_front() {
            let Some(mut w) = World::start().await else { return };
            for fingerprinted in [true, false] {
                let key = w.key(if fingerprinted { "batch-fp" } else { "batch" });
                let mut batch = w.pool.begin().await.unwrap();
                let first = if fingerprinted {
                    apply_fp(&w.store, &mut batch, key.clone(), &w.effects, 1, 7).await
                } else {
                    apply(&w.store, &mut batch, key.clone(), &w.effects, 1).await
                };
                assert_eq!(first.unwrap(), 1);
                // The front's settle claim (one second) lapses while the batch goes on.
                tokio::time::sleep(Duration::from_millis(1300)).await;
                let second = tokio::time::timeout(Duration::from_secs(10), async {
                    if fingerprinted {
                        apply_fp(&w.store, &mut batch, key.clone(), &w.effects, 2, 7).await
                    } else {
                        apply(&w.store, &mut batch, key.clone(), &w.effects, 2).await
                    }
                })
                .await
                .expect("the second call in the transaction never returned");
                match second {
                    // PostgreSQL and SQLite: the transaction's own mark replays; MySQL/MariaDB
                    // (one call per key in a transaction): in flight.
                    Ok(1) | Err(AppError::Idem(Error::InFlight { .. })) => {}
                    other => panic!("second call in the batch: {other:?}"),
                }
                assert_ne!(
                    w.front_tag(&key).await,
                    Some(b'D'),
                    "the front holds a done record of a transaction that has not committed"
                );
                batch.rollback().await.unwrap();
                // Nothing committed: the redelivery runs (once the front's claim has lapsed).
                let deadline = Instant::now() + SETTLE_DEADLINE;
                let redelivered = loop {
                    let mut tx = w.pool.begin().await.unwrap();
                    let out = if fingerprinted {
                        apply_fp(&w.store, &mut tx, key.clone(), &w.effects, 3, 7).await
                    } else {
                        apply(&w.store, &mut tx, key.clone(), &w.effects, 3).await
                    };
                    match out {
                        Err(AppError::Idem(Error::InFlight { .. })) if Instant::now() < deadline => {
                            tx.rollback().await.unwrap();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => {
                            tx.commit().await.unwrap();
                            break other;
                        }
                    }
                };
                assert_eq!(
                    redelivered.unwrap(),
                    3,
                    "the redelivery after the rollback did not run (fingerprinted: {fingerprinted})"
                );
            }
            // One committed effect per key: the redeliveries'.
            assert_eq!(
                w.rows().await,
                [(w.key("batch-fp"), 3), (w.key("batch"), 3)]
            );
            w.finish().await;
        }

        /// A long handler (three ttls) that reports whether its lease was lost; the test flushes
        /// its front record while it runs.
        #[idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.layered_tx",
            ttl = "300ms",
            keep = "60s"
        )]
        async fn apply_long(
            store: &Layered,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            halfway: tokio::sync::oneshot::Sender<()>,
            flushed: tokio::sync::oneshot::Receiver<()>,
        ) -> Result<bool, AppError> {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {effects} (msg_key, worker) VALUES ({}, 1)",
                DIALECT.p(1),
            )))
            .bind(&key)
            .execute(&mut **tx)
            .await?;
            let _ = halfway.send(());
            let _ = flushed.await;
            tokio::time::sleep(Duration::from_millis(900)).await;
            Ok(idem_runtime::current_lease().unwrap().is_lost())
        }

        /// Review finding (PostgreSQL, SQLite): in the layered transactional form, renewals went
        /// through the bare Redis store, without the re-claim of the plain form, so when Redis lost
        /// the record (a flush, a restart, a failover) `current_lease().is_lost()` turned true
        /// although the transaction still held the key: a handler that stops on `lost()`, as the
        /// README advises, abandoned safe work.
        #[tokio::test]
        async fn a_flushed_front_does_not_cost_a_transactional_lease() {
            if <$db as sqlx::Database>::NAME == "MySQL" {
                return; // the durable claim is a lease of its own there, renewed as such
            }
            let Some(w) = World::start().await else { return };
            let key = w.key("m-flush");
            let (halfway_tx, halfway) = tokio::sync::oneshot::channel();
            let (flushed, flushed_rx) = tokio::sync::oneshot::channel();
            let mut tx = w.pool.begin().await.unwrap();
            let store = w.store.clone();
            let effects = w.effects.clone();
            let record = w
                .store
                .front()
                .record_key("tests.layered_tx", &Key::new(&key).unwrap());
            let mut admin = w.admin.clone();
            let handler = apply_long(&store, &mut tx, key.clone(), &effects, halfway_tx, flushed_rx);
            let flush = async move {
                halfway.await.unwrap();
                let _: () = idem_runtime::redis::cmd("DEL")
                    .arg(&record)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                let _ = flushed.send(());
            };
            let (lost, ()) = tokio::join!(handler, flush);
            assert!(
                !lost.unwrap(),
                "the lease was reported lost although the transaction held the key"
            );
            tx.commit().await.unwrap();
            assert_eq!(w.rows().await, [(key, 1)]);
            w.finish().await;
        }

        /// After a committed call, a duplicate replays once the front has settled (the
        /// database answers and backfills the front), then the front answers the next
        /// duplicate at once; no second effect.
        #[tokio::test]
        async fn tx_attr_committed_duplicate_replays_from_the_front() {
            let Some(mut w) = World::start().await else { return };
            let key = w.key("m-3");
            assert_eq!(w.deliver(&key, 1).await.unwrap(), 1);
            let settled = Instant::now();
            let (out, refused) = w.deliver_past_in_flight(&key, 2).await;
            eprintln!(
                "the first duplicate replayed {:?} after the commit ({refused} refusals)",
                settled.elapsed()
            );
            assert_eq!(out.unwrap(), 1, "the duplicate did not replay");
            // The front holds the done record now ('D'), copied from the database.
            assert_eq!(
                w.front_tag(&key).await,
                Some(b'D'),
                "the front was not backfilled with the done record"
            );
            // So the next duplicate is answered at once, by the front.
            assert_eq!(w.deliver(&key, 3).await.unwrap(), 1);
            assert_eq!(w.rows().await, [(key, 1)]);
            w.finish().await;
        }
    };
}

mod postgres {
    static MISSING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    async fn connect() -> Option<idem_runtime::sqlx::PgPool> {
        let url = std::env::var("POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        if let Some(e) = MISSING.get() {
            crate::support::server_missing("PostgreSQL", &url, e);
            return None;
        }
        let pool = idem_runtime::sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await;
        match pool {
            Ok(pool) => Some(pool),
            Err(e) => {
                let _ = MISSING.set(e.to_string());
                crate::support::server_missing("PostgreSQL", &url, e);
                None
            }
        }
    }

    layered_tx_tests!(
        idem_runtime::sqlx::Postgres,
        connect,
        Dialect {
            text: "TEXT",
            serial_pk: "BIGSERIAL PRIMARY KEY",
            placeholder: crate::sql_common::dollar,
        }
    );
}

mod mysql {
    static MISSING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    async fn connect() -> Option<idem_runtime::sqlx::MySqlPool> {
        let url = std::env::var("MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
        if let Some(e) = MISSING.get() {
            crate::support::server_missing("MySQL/MariaDB", &url, e);
            return None;
        }
        let pool = idem_runtime::sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await;
        match pool {
            Ok(pool) => Some(pool),
            Err(e) => {
                let _ = MISSING.set(e.to_string());
                crate::support::server_missing("MySQL/MariaDB", &url, e);
                None
            }
        }
    }

    layered_tx_tests!(
        idem_runtime::sqlx::MySql,
        connect,
        Dialect {
            text: "VARCHAR(100)",
            serial_pk: "BIGINT AUTO_INCREMENT PRIMARY KEY",
            placeholder: crate::sql_common::question,
        }
    );
}

mod sqlite {
    /// One file per test (see sql_sqlite.rs).
    async fn connect() -> Option<idem_runtime::sqlx::SqlitePool> {
        use idem_runtime::sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions,
        };
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "idem-layered-{}.sqlite",
            crate::sql_common::test_name()
        ));
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .expect("open the SQLite file");
        Some(pool)
    }

    layered_tx_tests!(
        idem_runtime::sqlx::Sqlite,
        connect,
        Dialect {
            text: "TEXT",
            serial_pk: "INTEGER PRIMARY KEY AUTOINCREMENT",
            placeholder: crate::sql_common::question,
        }
    );
}
