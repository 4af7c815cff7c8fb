//! Review (06ee355): `TxRef::identity` differs for one sqlx 0.8 transaction taken as
//! `&mut sqlx08::Transaction` (the outer: the Transaction object's address) and as `&mut *tx`,
//! a `&mut sqlx08::PgConnection` (the inner: the connection's address), so the inner call's
//! abort does not flag the outer. On PostgreSQL the abort also poisons the transaction
//! (`DO .. RAISE`), so the outer's mark fails and it answers `TransactionAborted` anyway: this
//! test checks that no done mark is left without its effect (it passes: sound in effect).
#[path = "pg_foreign/mod.rs"]
mod pg_foreign;
#[path = "support/sql.rs"]
mod sql;
mod support;

use idem_runtime::{Error, PgStore, idempotent};
use pg_foreign::{Setup, url};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db08(#[from] sqlx08::Error),
    #[error("the handler refused")]
    Refused,
}

#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested08")]
async fn inner08(
    store: &PgStore,
    tx: &mut sqlx08::PgConnection,
    key: String,
    insert: &str,
) -> Result<u32, AppError> {
    sqlx08::query(insert).bind(&key).execute(&mut *tx).await?;
    sqlx08::raw_sql("ROLLBACK").execute(&mut *tx).await?;
    Err(AppError::Refused)
}

#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested08")]
async fn outer08(
    store: &PgStore,
    tx: &mut sqlx08::Transaction<'_, sqlx08::Postgres>,
    key: String,
    insert: &str,
) -> Result<u32, AppError> {
    sqlx08::query(insert).bind(&key).execute(&mut **tx).await?;
    let nested = inner08(store, &mut *tx, format!("{key}.in"), insert).await;
    assert!(
        matches!(
            nested,
            Err(AppError::Idem(Error::TransactionAborted { .. }))
        ),
        "{nested:?}"
    );
    Ok(1)
}

#[tokio::test]
async fn sqlx08_outer_transaction_inner_connection_leaves_no_mark_without_effect() {
    let Some(s) = Setup::new("rv3_n08").await else {
        return;
    };
    let pool = sqlx08::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url())
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let out = outer08(&s.store, &mut tx, "o".into(), &s.insert()).await;
    let committed = tx.commit().await;
    let (e, m) = (s.effects_of("o").await, s.marks_of("o").await);
    s.drop_tables().await;
    assert_eq!(
        e, m,
        "{out:?}, commit {committed:?}: {m} mark(s), {e} effect(s)"
    );
    assert!(out.is_err(), "{out:?}");
}
