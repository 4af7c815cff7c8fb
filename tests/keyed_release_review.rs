//! Review (06ee355, unkeyed.rs): an unkeyed call whose savepoint cannot be released after `Ok`
//! now answers `TransactionAborted`, but the keyed transactional form still calls the same
//! failure "harmless: the transaction's end releases it" (run/tx.rs, after `complete_in`). A
//! handler that ends the transaction itself (the case README names) and returns `Ok`: its writes
//! are rolled back, the done mark is then written with no transaction around it (autocommit:
//! the claim row went with the rollback, so the mark's insert path writes a done row), the
//! `RELEASE SAVEPOINT` fails, and the call answers `Ok`. A done mark committed for writes that
//! never were: a lost effect. On PostgreSQL (sqlx 0.9) and SQLite alike.
#[path = "pg_foreign/mod.rs"]
mod pg_foreign;
#[path = "support/sql.rs"]
mod sql;
mod support;

use std::time::Duration;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use idem_runtime::sqlx::{self, AssertSqlSafe, Postgres, Sqlite};
use idem_runtime::{Error, PgStore, SqliteStore, idempotent};
use pg_foreign::Setup;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.keyed_release")]
async fn ends_tx_pg(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    key: String,
    insert: &str,
) -> Result<u32, AppError> {
    sqlx::query(AssertSqlSafe(insert.to_owned()))
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await?;
    Ok(1)
}

#[tokio::test]
async fn keyed_ok_after_the_handler_ended_the_transaction_is_not_ok_postgres() {
    let Some(s) = Setup::new("rv3_rel").await else {
        return;
    };
    let mut tx = s.pool.begin().await.unwrap();
    let out = ends_tx_pg(&s.store, &mut tx, "k".into(), &s.insert()).await;
    let committed = tx.commit().await;
    let (e, m) = (s.effects_of("k").await, s.marks_of("k").await);
    s.drop_tables().await;
    assert_eq!(
        e, m,
        "idem answered {out:?}, the commit {committed:?}: {m} done mark(s) for {e} effect(s)"
    );
}

#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.keyed_release")]
async fn ends_tx_sqlite(
    store: &SqliteStore,
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    key: String,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await?;
    Ok(1)
}

#[tokio::test]
async fn keyed_ok_after_the_handler_ended_the_transaction_is_not_ok_sqlite() {
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-rev3-keyed-release.sqlite");
    let _ = std::fs::remove_file(&path);
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .unwrap();
    sqlx::raw_sql("CREATE TABLE effects (k TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let out = ends_tx_sqlite(&store, &mut tx, "k".into()).await;
    let committed = tx.commit().await;
    let e: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    let m: i64 = sqlx::query_scalar("SELECT count(*) FROM idem_keys WHERE state = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        e, m,
        "idem answered {out:?}, the commit {committed:?}: {m} done mark(s) for {e} effect(s)"
    );
}
