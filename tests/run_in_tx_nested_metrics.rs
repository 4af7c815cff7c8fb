//! Review (core diff 310e5a8): `run_in_tx` now records the outer call's `Executed` only once its
//! commit succeeded, and `CommitFailed` when it fails. A transactional call nested in its
//! handler (the attribute on the same transaction) is given no `Owned` and still records
//! `Executed` at its mark, before the owner's commit, and nothing corrects it when that commit
//! fails: `idem_calls_total{outcome="executed"}` counts an effect that was rolled back with the
//! outer transaction. (PostgreSQL: `POSTGRES_URL`; a recorder of its own: a binary of its own.)
#[path = "support/sql.rs"]
mod sql;
mod support;

use std::collections::HashMap;

use idem_runtime::sqlx::{self, AssertSqlSafe, Postgres};
use idem_runtime::{Call, CallOutcome, Error, Options, PgStore, Token, idempotent, observe};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

use sql::AppError;

/// The nested call: its effect is the row, in the outer call's transaction.
#[idempotent(key = "key", tx = "tx", store = "store", scope = "rvc.nested.inner")]
async fn inner(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    key: String,
    insert: String,
) -> Result<u32, AppError> {
    sqlx::query(AssertSqlSafe(insert))
        .execute(&mut **tx)
        .await?;
    Ok(1)
}

#[tokio::test]
async fn a_nested_call_in_run_in_tx_is_counted_executed_although_the_outer_commit_failed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let Some(pool) = sql::postgres(4).await else {
        return;
    };
    let suffix = Token::generate().to_hex();
    let table = format!("idem_rvn_{suffix}");
    let coupons = format!("coupons_rvn_{suffix}");
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    // A constraint checked at commit: the writes pass, the commit fails.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {coupons} (order_id BIGINT UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let opts = Options::new("rvc.nested.outer");
    let insert = format!("INSERT INTO {coupons} VALUES (7), (7)");
    let nested = store.clone();
    let (out, report) = observe(store.run_in_tx(&opts, Call::new("order-7"), move |tx| {
        Box::pin(async move {
            let (n, inner_report) = observe(inner(&nested, tx, "line-1".into(), insert)).await;
            let n = n?;
            assert_eq!(inner_report.map(|r| r.outcome), Some(CallOutcome::Executed));
            Ok::<u32, AppError>(n)
        })
    }))
    .await;
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {coupons}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    let inner_done: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE state = 2"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(sql::drop_tables(&table, &[&coupons]))
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        matches!(out, Err(AppError::Idem(Error::Unavailable { .. }))),
        "{out:?}"
    );
    assert_eq!(report.map(|r| r.outcome), Some(CallOutcome::CommitFailed));
    assert_eq!(
        (rows, inner_done),
        (0, 0),
        "the commit failed: nothing is kept"
    );
    let mut counts: HashMap<(String, String), u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() != "idem_calls_total" {
            continue;
        }
        let labels: HashMap<_, _> = key.labels().map(|l| (l.key(), l.value())).collect();
        if let DebugValue::Counter(n) = value {
            counts.insert(
                (labels["scope"].to_owned(), labels["outcome"].to_owned()),
                n,
            );
        }
    }
    let inner_executed = counts
        .get(&("rvc.nested.inner".to_owned(), "executed".to_owned()))
        .copied()
        .unwrap_or(0);
    assert_eq!(
        inner_executed, 0,
        "the nested call's writes and mark were rolled back with the outer commit, yet it is \
         counted executed; all counts: {counts:?}"
    );
}
