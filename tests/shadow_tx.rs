//! Shadow mode with `run_in_tx` (process-wide, hence a binary of its own): a duplicate that
//! idem would have replayed runs, and its writes commit as they would without idem. (They used
//! to be rolled back: `run_in_tx` committed only a transaction that holds a fresh done mark.)

use std::time::Duration;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{Call, CallOutcome, Error, Options, SqliteStore, Would, observe, set_shadow};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[tokio::test]
async fn shadow_mode_commits_the_writes_of_a_duplicate_it_lets_through() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-shadow-tx.sqlite");
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
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE coupons (n INTEGER)")
        .execute(&pool)
        .await
        .unwrap();
    let opts = Options::new("shadow_tx.issue");
    set_shadow(true);
    let mut outcomes = Vec::new();
    for n in 1..=2 {
        let (out, report) = observe(store.run_in_tx(&opts, Call::new("order-1"), move |tx| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!("INSERT INTO coupons VALUES ({n})")))
                    .execute(&mut **tx)
                    .await?;
                Ok::<u32, AppError>(n)
            })
        }))
        .await;
        assert_eq!(out.unwrap(), n, "shadow mode never replays");
        outcomes.push(report.map(|r| r.outcome));
    }
    set_shadow(false);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Some(CallOutcome::Executed),
            Some(CallOutcome::Shadowed {
                would: Would::Replay
            })
        ]
    );
    assert_eq!(
        rows, 2,
        "both runs' writes commit in shadow mode, as without idem"
    );
}
