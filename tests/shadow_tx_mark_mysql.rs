//! Review (core diff 310e5a8): shadow mode, `run_in_tx` on MySQL/MariaDB (claim outside the
//! transaction), the done mark refused by the database. The new shadow branch in `execute_tx`
//! (run/tx.rs) *releases* the savepoint (the caller's transaction keeps the row lock its failed
//! mark statement took on the claim's row) and then gives the key back through the side pool
//! (`release_in`): that release waits on the caller's own transaction, which cannot commit
//! before it returns. The call hangs for `innodb_lock_wait_timeout` (50 s by default, past the
//! lease's ttl), and the claim is still pending when it answers. Without shadow mode the same
//! failure answers in milliseconds (the savepoint is rolled back first) and leaves no claim.
//! (Process-wide switch: a binary of its own. `MYSQL_URL`.)
#[path = "support/sql.rs"]
mod sql;
mod support;

use std::time::{Duration, Instant};

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, Error, MySqlStore, Options, Token, observe, set_shadow};

use sql::AppError;

#[tokio::test]
async fn shadow_mode_mark_failure_in_run_in_tx_on_mysql_gives_the_key_back_promptly() {
    let Some(pool) = sql::mysql(4).await else {
        return;
    };
    let suffix = &Token::generate().to_hex()[..12];
    let table = format!("idem_rvm_{suffix}");
    let coupons = format!("coupons_rvm_{suffix}");
    let store = MySqlStore::with_table(pool.clone(), &table).unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE TABLE {coupons} (n BIGINT)")))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TRIGGER {table}_refuse BEFORE UPDATE ON {table} FOR EACH ROW BEGIN \
           IF NEW.state = 2 THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'done mark refused (injected)'; END IF; \
         END"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let opts = Options::new("rvm.shadow_tx_mark").ttl(Duration::from_secs(30));
    let insert = format!("INSERT INTO {coupons} VALUES (1)");
    set_shadow(true);
    let started = Instant::now();
    let call = observe(store.run_in_tx(&opts, Call::new("order-1"), |tx| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(insert))
                .execute(&mut **tx)
                .await?;
            Ok::<u32, AppError>(1)
        })
    }));
    let answered = tokio::time::timeout(Duration::from_secs(20), call).await;
    let took = started.elapsed();
    set_shadow(false);
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {coupons}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    let pending: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE state = 1"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(sql::drop_tables(&table, &[&coupons]))
        .execute(&pool)
        .await
        .unwrap();
    let Ok((out, report)) = answered else {
        panic!(
            "shadow mode: run_in_tx had not answered after {took:?} (its claim's release waits \
             on the row lock of the caller's own transaction); {rows} rows, {pending} claims \
             pending once it was dropped"
        );
    };
    let report = report.map(|r| r.outcome);
    assert!(
        // Fixed: the writes go with the failed mark (shadow mode too), as without shadow mode.
        matches!(out, Err(AppError::Idem(Error::Unavailable { .. })))
            && rows == 0
            && pending == 0
            && took < Duration::from_secs(5),
        "answered {out:?} ({report:?}) after {took:?}; {rows} rows kept, {pending} claims left pending"
    );
}
