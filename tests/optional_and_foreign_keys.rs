//! Keys as handlers already have them (issue 18): an `Option` key (an optional
//! `Idempotency-Key` header) runs a call without a key as a plain call, and a key of another
//! crate's type with `Display` (which cannot implement `KeyPart` there) is keyed by its text.
//! On the memory store, and the transactional form on PostgreSQL (`POSTGRES_URL`).
#[path = "support/sql.rs"]
mod sql;
mod support;

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::sqlx::{self, AssertSqlSafe, Postgres};
use idem_runtime::{
    Call, CallOutcome, Error, Key, MemoryStore, Operations, PgStore, Token, idempotent, observe,
};

use sql::AppError;

/// Another crate's id type, as far as idem can tell: `Display`, no `KeyPart`.
struct ForeignUuid(u128);

impl fmt::Display for ForeignUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A header a client may leave out, as idem-http's `IdempotencyKey`.
#[derive(Clone)]
struct RequestId(String);

impl idem_runtime::KeyPart for RequestId {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out)
    }
}

impl idem_runtime::OptionalKey for RequestId {}

fn rid(s: &str) -> Option<RequestId> {
    Some(RequestId(s.into()))
}

#[idempotent(key = "key", store = "store", scope = "keys.optional")]
async fn pay(
    store: &MemoryStore,
    runs: &AtomicU32,
    key: Option<RequestId>,
) -> Result<u32, AppError> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn a_call_without_its_optional_key_runs_every_time_and_one_with_it_once() {
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    assert_eq!(pay(&store, &runs, None).await.unwrap(), 1);
    assert_eq!(pay(&store, &runs, None).await.unwrap(), 2);
    // Nothing was claimed or marked for the calls without a key.
    let listed = store
        .list("keys.optional", &idem_runtime::ListQuery::new(10))
        .await
        .unwrap();
    assert!(listed.records.is_empty(), "{:?}", listed.records);
    // Not reported as an idempotent call either: there was none.
    let (out, report) = observe(pay(&store, &runs, None)).await;
    assert_eq!(out.unwrap(), 3);
    assert!(report.is_none());

    assert_eq!(pay(&store, &runs, rid("k-1")).await.unwrap(), 4);
    let (out, report) = observe(pay(&store, &runs, rid("k-1"))).await;
    assert_eq!(out.unwrap(), 4, "replayed");
    assert_eq!(report.map(|r| r.outcome), Some(CallOutcome::Replayed));
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_empty_optional_key_is_refused_not_run_unkeyed() {
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    let out = pay(&store, &runs, rid("")).await;
    assert!(
        matches!(out, Err(AppError::Idem(Error::InvalidKey { .. }))),
        "{out:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[idempotent(key = "article", store = "store", scope = "keys.foreign")]
async fn favorite(
    store: &MemoryStore,
    runs: &AtomicU32,
    article: ForeignUuid,
) -> Result<u32, AppError> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[idempotent(
    key = "{user}/{article}",
    store = "store",
    scope = "keys.foreign.template"
)]
async fn favorite_for(
    store: &MemoryStore,
    runs: &AtomicU32,
    user: u64,
    article: ForeignUuid,
) -> Result<u32, AppError> {
    Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn a_foreign_display_key_is_keyed_by_its_text() {
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    let id = 0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8_u128;
    assert_eq!(favorite(&store, &runs, ForeignUuid(id)).await.unwrap(), 1);
    assert_eq!(favorite(&store, &runs, ForeignUuid(id)).await.unwrap(), 1);
    assert_eq!(
        favorite(&store, &runs, ForeignUuid(id + 1)).await.unwrap(),
        2
    );
    // The stored key is the value's `Display` text, what an operator types into `idem inspect`.
    let text = format!("{id:032x}");
    let state = store
        .inspect("keys.foreign", &Key::new(text.as_str()).unwrap())
        .await
        .unwrap();
    assert!(
        matches!(state, idem_runtime::KeyState::Done { .. }),
        "{state:?}"
    );
    // In a template, too: two users, one article.
    assert_eq!(
        favorite_for(&store, &runs, 1, ForeignUuid(id))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        favorite_for(&store, &runs, 1, ForeignUuid(id))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        favorite_for(&store, &runs, 2, ForeignUuid(id))
            .await
            .unwrap(),
        4
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

/// The transactional form with an optional key: without one, the handler's writes are the
/// caller's to commit, and no mark is written.
#[idempotent(key = "key", tx = "tx", store = "store", scope = "keys.optional.tx")]
async fn record(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    key: Option<RequestId>,
    insert: String,
) -> Result<u32, AppError> {
    sqlx::query(AssertSqlSafe(insert))
        .execute(&mut **tx)
        .await?;
    Ok(1)
}

#[tokio::test]
async fn the_transactional_form_runs_a_call_without_a_key_in_the_callers_transaction() {
    let Some(pool) = sql::postgres(4).await else {
        return;
    };
    let suffix = Token::generate().to_hex();
    let table = format!("idem_okt_{suffix}");
    let effects = format!("effects_okt_{suffix}");
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE TABLE {effects} (n INT)")))
        .execute(&pool)
        .await
        .unwrap();
    let insert = format!("INSERT INTO {effects} VALUES (1)");
    for key in [None, None, rid("7"), rid("7")] {
        let mut tx = pool.begin().await.unwrap();
        record(&store, &mut tx, key, insert.clone()).await.unwrap();
        tx.commit().await.unwrap();
    }
    // A call without a key, rolled back by its caller: its write is gone with it.
    let mut tx = pool.begin().await.unwrap();
    record(&store, &mut tx, None, insert.clone()).await.unwrap();
    tx.rollback().await.unwrap();
    let count = |sql: String| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    // Two without a key, one for key 7 (its duplicate replayed).
    assert_eq!(count(format!("SELECT count(*) FROM {effects}")).await, 3);
    // Only the keyed call left a record.
    assert_eq!(count(format!("SELECT count(*) FROM {table}")).await, 1);
    sqlx::raw_sql(sql::drop_tables(&table, &[&effects]))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn run_in_tx_refuses_a_call_without_a_key() {
    let Some(pool) = sql::postgres(2).await else {
        return;
    };
    let table = format!("idem_okr_{}", Token::generate().to_hex());
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    let opts = idem_runtime::Options::new("keys.optional.run_in_tx");
    let runs = std::sync::Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let out: Result<u32, Error> = store
        .run_in_tx(&opts, Call::unkeyed(), move |_tx| {
            Box::pin(async move {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
        })
        .await;
    assert!(matches!(out, Err(Error::InvalidKey { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    sqlx::raw_sql(sql::drop_tables(&table, &[]))
        .execute(&pool)
        .await
        .unwrap();
}

/// Review rev1: the transactional form rolls a handler's writes back to idem's savepoint when it
/// returns `Err` (README: "a `commit` after the error commits nothing of them"). The call without
/// a key takes no savepoint: a failed handler's partial writes stay in the caller's transaction,
/// and a caller that commits after the error (its own writes, an audit row) commits them too.
#[idempotent(
    key = "key",
    tx = "tx",
    store = "store",
    scope = "keys.optional.tx.err"
)]
async fn record_then_fail(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    key: Option<RequestId>,
    insert: String,
) -> Result<u32, AppError> {
    sqlx::query(AssertSqlSafe(insert))
        .execute(&mut **tx)
        .await?;
    Err(AppError::Idem(Error::InvalidKey {
        reason: "the handler failed after its first write",
    }))
}

#[tokio::test]
async fn a_failed_handler_without_a_key_leaves_no_writes_in_the_callers_commit() {
    let Some(pool) = sql::postgres(4).await else {
        return;
    };
    let suffix = Token::generate().to_hex();
    let table = format!("idem_oke_{suffix}");
    let effects = format!("effects_oke_{suffix}");
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE TABLE {effects} (n INT)")))
        .execute(&pool)
        .await
        .unwrap();
    let insert = format!("INSERT INTO {effects} VALUES (1)");
    let mut counts = Vec::new();
    for key in [rid("8"), None] {
        let mut tx = pool.begin().await.unwrap();
        assert!(
            record_then_fail(&store, &mut tx, key, insert.clone())
                .await
                .is_err()
        );
        // The caller logs the failure and commits its own work.
        tx.commit().await.unwrap();
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {effects}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        counts.push(n);
    }
    sqlx::raw_sql(sql::drop_tables(&table, &[&effects]))
        .execute(&pool)
        .await
        .unwrap();
    // Keyed: undone to the savepoint (0). Without a key: the same must hold.
    assert_eq!(counts, [0, 0], "the failed handler's write was committed");
}
