//! `run_in_tx` owns the commit, and knows when it failed: it answers `Unavailable { Complete }`
//! (the effect rolled back). But the report `observe` gets, the span's `outcome` and
//! `idem_calls_total` all say `executed`: the outcome was delivered when the mark was written in
//! the transaction, before the commit, and nothing corrects it. A consumer (or a dashboard) is
//! told of a first run whose effect does not exist. (PostgreSQL: `POSTGRES_URL`.)
#[path = "support/sql.rs"]
mod sql;
mod support;

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, CallOutcome, Error, Options, PgStore, Token, observe};

use sql::AppError;

#[tokio::test]
async fn a_commit_that_fails_in_run_in_tx_is_reported_as_executed() {
    let Some(pool) = sql::postgres(4).await else {
        return;
    };
    let suffix = Token::generate().to_hex();
    let table = format!("idem_rv17_{suffix}");
    let coupons = format!("coupons_rv17_{suffix}");
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    // A constraint checked at commit: the handler's writes pass, the commit fails.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {coupons} (order_id BIGINT UNIQUE DEFERRABLE INITIALLY DEFERRED)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let opts = Options::new("rv17.run_in_tx");
    let insert = format!("INSERT INTO {coupons} VALUES (7), (7)");
    let (out, report) = observe(store.run_in_tx(&opts, Call::new("order-7"), |tx| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(insert))
                .execute(&mut **tx)
                .await?;
            Ok::<u32, AppError>(1)
        })
    }))
    .await;
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {coupons}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(sql::drop_tables(&table, &[&coupons]))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 0,
        "the commit failed: nothing of the handler's is kept"
    );
    assert!(
        matches!(out, Err(AppError::Idem(Error::Unavailable { .. }))),
        "{out:?}"
    );
    let outcome = report.map(|r| r.outcome);
    assert_ne!(
        outcome,
        Some(CallOutcome::Executed),
        "run_in_tx answered {out:?} (its commit failed, {rows} rows kept), and reported {outcome:?}"
    );
}
