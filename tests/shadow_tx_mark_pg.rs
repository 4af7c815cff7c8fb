//! Review (core diff 310e5a8): shadow mode, `run_in_tx` on PostgreSQL, the done mark refused by
//! the database. The new shadow branch in `execute_tx` (run/tx.rs) releases the savepoint and
//! answers the handler's `Ok`, and `run_owned` commits. But on PostgreSQL a failed statement
//! aborts the whole transaction: the savepoint's release fails, the COMMIT silently rolls back,
//! and the caller is told `Ok` for writes that do not exist (without idem they would have
//! committed). (Process-wide switch: a binary of its own. PostgreSQL: `POSTGRES_URL`.)
#[path = "support/sql.rs"]
mod sql;
mod support;

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, Options, PgStore, Token, observe, set_shadow};

use sql::AppError;

#[tokio::test]
async fn shadow_mode_mark_failure_in_run_in_tx_answers_ok_for_rolled_back_writes_on_postgres() {
    let Some(pool) = sql::postgres(4).await else {
        return;
    };
    let suffix = Token::generate().to_hex();
    let table = format!("idem_rvc_{suffix}");
    let coupons = format!("coupons_rvc_{suffix}");
    let store = PgStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {coupons} (n BIGINT);
         CREATE FUNCTION {table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'done mark refused (injected)'; END $$;
         CREATE TRIGGER {table}_refuse BEFORE INSERT OR UPDATE ON {table}
           FOR EACH ROW WHEN (NEW.state = 2) EXECUTE FUNCTION {table}_refuse();"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let opts = Options::new("rvc.shadow_tx_mark");
    let insert = format!("INSERT INTO {coupons} VALUES (1)");
    set_shadow(true);
    let (out, report) = observe(store.run_in_tx(&opts, Call::new("order-1"), |tx| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(insert))
                .execute(&mut **tx)
                .await?;
            Ok::<u32, AppError>(1)
        })
    }))
    .await;
    set_shadow(false);
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {coupons}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {coupons}; DROP TABLE IF EXISTS {table}; \
         DROP TABLE IF EXISTS {table}_migrations; DROP FUNCTION IF EXISTS {table}_refuse();"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let report = report.map(|r| r.outcome);
    assert!(
        !(out.is_ok() && rows == 0),
        "run_in_tx answered {out:?} ({report:?}) in shadow mode, but the handler's writes were \
         rolled back ({rows} rows): the caller acks an effect that does not exist"
    );
}
