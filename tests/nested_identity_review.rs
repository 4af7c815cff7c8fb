//! Review (06ee355): a transactional call nested in another that finds its own transaction gone
//! rolls it back and flags *only the immediately enclosing* call, and only when that call runs on
//! the same transaction (`Held.tx`). An outer call on transaction T1 whose handler calls a keyed
//! call on another transaction T2, whose handler in turn calls a call on T1 (passed down), is
//! never told: the innermost call rolls T1 back and checks the middle call only (T2: not the
//! same, so not flagged); the outer is not checked at all, and the middle call, which returns
//! the error, never calls `aborted` to pass it on. The same with a middle call that has no
//! transaction (`Held.tx` = 0). The identity test itself is sound; the walk stops one level up.
//!
//! On SQLite the abort is `ROLLBACK; BEGIN` (no poisoning, unlike PostgreSQL's `DO .. RAISE`):
//! the outer's mark then finds its claim row gone, inserts a done row in the fresh transaction
//! (`COMPLETE`), the failed `RELEASE SAVEPOINT` is "harmless", and the call answers `Ok`. The
//! caller commits: a done mark for writes that were rolled back (a lost effect).
// The connection is passed as `&mut **tx` on purpose: which object a call is given is what
// its transaction's identity is taken from.
#![allow(clippy::explicit_auto_deref)]

use std::time::Duration;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use idem_runtime::sqlx::{self, SqliteConnection, SqlitePool};
use idem_runtime::{Error, SqliteStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the handler refused")]
    Refused,
}

async fn pool(name: &str) -> SqlitePool {
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("idem-rev3-{name}.sqlite"));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("sqlite-wal"));
    let _ = std::fs::remove_file(path.with_extension("sqlite-shm"));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
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
    pool
}

async fn count(pool: &SqlitePool, sql: &str, k: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(k)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn effects(pool: &SqlitePool, k: &str) -> i64 {
    count(pool, "SELECT count(*) FROM effects WHERE k = ?1", k).await
}

async fn marks(pool: &SqlitePool, k: &str) -> i64 {
    count(
        pool,
        "SELECT count(*) FROM idem_keys WHERE idem_key = ?1 AND state = 2",
        k,
    )
    .await
}

/// Ends its transaction itself, then fails: undoing to idem's savepoint fails, idem rolls the
/// whole transaction back (`TransactionAborted`).
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn innermost(
    store: &SqliteStore,
    tx: &mut SqliteConnection,
    key: String,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("ROLLBACK").execute(&mut *tx).await?;
    Err(AppError::Refused)
}

/// On its own transaction (another database), calls `innermost` on the outer's.
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn middle(
    store: &SqliteStore,
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    key: String,
    outer_store: &SqliteStore,
    outer_tx: &mut SqliteConnection,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    innermost(outer_store, outer_tx, format!("{key}.in")).await
}

/// A keyed call without a transaction (its `Held.tx` is 0), calling `innermost` on the outer's.
#[idempotent(key = "key", store = "store", scope = "rev3.nested")]
async fn plain_middle(
    store: &SqliteStore,
    key: String,
    outer_store: &SqliteStore,
    outer_tx: &mut SqliteConnection,
) -> Result<u32, AppError> {
    innermost(outer_store, outer_tx, format!("{key}.in")).await
}

/// A best-effort nested step: its failure is logged, not fatal (as `outer` in
/// pg_foreign_review.rs ignores its failing inner call).
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn outer(
    store: &SqliteStore,
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    key: String,
    other: &SqliteStore,
    direct: bool,
    plain: bool,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    let nested = if plain {
        plain_middle(other, format!("{key}.plain"), store, &mut **tx).await
    } else if direct {
        innermost(store, &mut **tx, format!("{key}.direct")).await
    } else {
        let mut t2 = other.pool().begin().await?;
        let out = middle(other, &mut t2, format!("{key}.mid"), store, &mut **tx).await;
        t2.commit().await?;
        out
    };
    assert!(
        matches!(
            nested,
            Err(AppError::Idem(Error::TransactionAborted { .. }))
        ),
        "{nested:?}"
    );
    Ok(1)
}

async fn run(direct: bool, plain: bool, name: &str) {
    let p1 = pool(&format!("{name}-1")).await;
    let p2 = pool(&format!("{name}-2")).await;
    let s1 = SqliteStore::new(p1.clone());
    s1.migrate().await.unwrap();
    let s2 = SqliteStore::new(p2.clone());
    s2.migrate().await.unwrap();
    let mut tx = p1.begin().await.unwrap();
    let out = outer(&s1, &mut tx, "o".into(), &s2, direct, plain).await;
    let committed = tx.commit().await;
    let (e, m) = (effects(&p1, "o").await, marks(&p1, "o").await);
    assert_eq!(
        e, m,
        "the outer answered {out:?}, the commit {committed:?}: {m} done mark(s) for {e} effect(s) \
         (its writes were rolled back by the innermost call on its transaction)"
    );
}

/// Control: the innermost call nested directly in the outer one (same transaction): flagged.
#[tokio::test]
async fn an_abort_nested_directly_stops_the_outer_mark() {
    run(true, false, "direct").await;
}

/// The defect: with a call on another transaction in between, the outer marks.
#[tokio::test]
async fn an_abort_nested_through_a_call_on_another_transaction_stops_the_outer_mark() {
    run(false, false, "through").await;
}

/// The same with a keyed call without a transaction in between.
#[tokio::test]
async fn an_abort_nested_through_a_call_without_a_transaction_stops_the_outer_mark() {
    run(false, true, "plain").await;
}

/// As `innermost`, on the transaction itself rather than its connection.
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn innermost_tx(
    store: &SqliteStore,
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    key: String,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await?;
    Err(AppError::Refused)
}

/// Sound (passes): a `run_in_tx` outer call and an attribute inner one on its transaction, taken
/// as `&mut **tx` (the connection) or as the transaction: one identity, the outer does not mark.
#[tokio::test]
async fn run_in_tx_outer_with_an_attribute_inner_on_its_connection_or_transaction() {
    for as_conn in [true, false] {
        let p1 = pool(&format!("run_in_tx-{as_conn}")).await;
        let s1 = SqliteStore::new(p1.clone());
        s1.migrate().await.unwrap();
        let opts = idem_runtime::Options::new("rev3.nested.run_in_tx");
        let s = s1.clone();
        let out: Result<u32, AppError> = s1
            .run_in_tx(&opts, idem_runtime::Call::new("o"), move |tx| {
                Box::pin(async move {
                    let s = &s;
                    sqlx::query("INSERT INTO effects VALUES ('o')")
                        .execute(&mut **tx)
                        .await?;
                    let nested = if as_conn {
                        innermost(s, &mut **tx, "o.in".into()).await
                    } else {
                        innermost_tx(s, tx, "o.in".into()).await
                    };
                    assert!(
                        matches!(
                            nested,
                            Err(AppError::Idem(Error::TransactionAborted { .. }))
                        ),
                        "{nested:?}"
                    );
                    Ok(1)
                })
            })
            .await;
        let (e, m) = (effects(&p1, "o").await, marks(&p1, "o").await);
        assert_eq!(
            e, m,
            "as_conn {as_conn}: {out:?}: {m} mark(s), {e} effect(s)"
        );
        assert!(out.is_err(), "{out:?}");
    }
}

/// A key the caller may leave out.
#[derive(Clone)]
struct Rid(String);
impl idem_runtime::KeyPart for Rid {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out)
    }
}
impl idem_runtime::OptionalKey for Rid {}

/// Unkeyed (no key given): ends the transaction and answers `Ok`.
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn unkeyed_ends(
    store: &SqliteStore,
    tx: &mut SqliteConnection,
    key: Option<Rid>,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES ('unkeyed')")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("ROLLBACK").execute(&mut *tx).await?;
    Ok(7)
}

#[idempotent(key = "key", tx = "tx", store = "store", scope = "rev3.nested")]
async fn outer_of_unkeyed(
    store: &SqliteStore,
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    key: String,
) -> Result<u32, AppError> {
    sqlx::query("INSERT INTO effects VALUES (?1)")
        .bind(&key)
        .execute(&mut **tx)
        .await?;
    let nested = unkeyed_ends(store, &mut **tx, None).await;
    assert!(
        matches!(
            nested,
            Err(AppError::Idem(Error::TransactionAborted { .. }))
        ),
        "{nested:?}"
    );
    Ok(1)
}

/// Sound (passes), 06ee355 (b): an unkeyed `Ok` whose savepoint cannot be released is
/// `TransactionAborted`, and flags the enclosing call on the same transaction.
#[tokio::test]
async fn unkeyed_ok_unreleasable_flags_the_enclosing_call() {
    let p1 = pool("unkeyed").await;
    let s1 = SqliteStore::new(p1.clone());
    s1.migrate().await.unwrap();
    let mut tx = p1.begin().await.unwrap();
    let out = outer_of_unkeyed(&s1, &mut tx, "o".into()).await;
    let _ = tx.commit().await;
    let (e, m) = (effects(&p1, "o").await, marks(&p1, "o").await);
    assert_eq!(e, m, "{out:?}: {m} mark(s), {e} effect(s)");
    assert!(out.is_err(), "{out:?}");
}
