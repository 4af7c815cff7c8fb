//! Review (core diff 310e5a8): shadow mode, `run_in_tx` on SQLite, the done mark refused by the
//! database. The new shadow branch in `execute_tx` (run/tx.rs) *releases* the savepoint to keep
//! the handler's writes and says "only the key is given back", but `release_in` is a no-op on a
//! store that claims in the transaction ("undone with the savepoint" — which was released, not
//! rolled back). The pending claim row commits with the writes: the key is left in flight until
//! its ttl, and once shadow mode is switched off a redelivery is refused although nothing holds
//! the key. (Process-wide switch: a binary of its own.)

use std::time::Duration;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use idem_runtime::sqlx::{self};
use idem_runtime::{Call, Error, Options, SqliteStore, observe, set_shadow};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[tokio::test]
async fn shadow_mode_mark_failure_in_run_in_tx_leaves_the_claim_committed_in_flight() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-shadow-tx-mark.sqlite");
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
    sqlx::raw_sql(
        "CREATE TABLE coupons (n INTEGER);
         CREATE TRIGGER mark_refused_u BEFORE UPDATE ON idem_keys WHEN NEW.state = 2
           BEGIN SELECT RAISE(ABORT, 'done mark refused (injected)'); END;
         CREATE TRIGGER mark_refused_i BEFORE INSERT ON idem_keys WHEN NEW.state = 2
           BEGIN SELECT RAISE(ABORT, 'done mark refused (injected)'); END;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let opts = Options::new("shadow_tx_mark.issue").ttl(Duration::from_secs(60));
    set_shadow(true);
    let (out, report) = observe(store.run_in_tx(&opts, Call::new("order-1"), |tx| {
        Box::pin(async move {
            sqlx::query("INSERT INTO coupons VALUES (1)")
                .execute(&mut **tx)
                .await?;
            Ok::<u32, AppError>(1)
        })
    }))
    .await;
    set_shadow(false);
    // The writes go with the mark, in shadow mode too: an error, and nothing kept (a redelivery
    // is then the handler's one run).
    assert!(
        matches!(out, Err(AppError::Idem(Error::Unavailable { .. }))),
        "{out:?}"
    );
    let report = report.map(|r| r.outcome);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 0,
        "an error answered: nothing of the handler's is kept"
    );
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idem_keys WHERE idem_key = 'order-1' AND state = 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // Shadow mode off, the database fixed: the message comes again.
    sqlx::raw_sql("DROP TRIGGER mark_refused_u; DROP TRIGGER mark_refused_i;")
        .execute(&pool)
        .await
        .unwrap();
    let again: Result<u32, AppError> = store
        .run_in_tx(&opts, Call::new("order-1"), |_tx| {
            Box::pin(async move { Ok::<u32, AppError>(2) })
        })
        .await;
    assert_eq!(
        again.as_ref().ok(),
        Some(&2),
        "the redelivery runs: {again:?}"
    );
    assert_eq!(
        pending, 0,
        "the shadowed call ({report:?}) said the key was given back, but its claim committed \
         in flight with the handler's writes; the next call (shadow off) got {again:?}"
    );
}
