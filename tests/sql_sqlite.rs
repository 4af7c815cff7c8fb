//! The SQL store on SQLite, on a file (in cargo's per-target temporary directory): the whole
//! conformance suite, migrations, purge, the transactional mode, and several worker processes
//! (racing, and killed with SIGKILL) on one database file.
mod sql_common;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

/// One file per test (shared with the test's worker processes): SQLite has one writer at a time,
/// so tests sharing a file would slow each other's lease renewals down.
async fn connect() -> Option<idem_runtime::sqlx::SqlitePool> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("idem-{}.sqlite", sql_common::test_name()));
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .expect("open the SQLite file");
    Some(pool)
}

crate::sql_store_tests!(
    idem_runtime::sqlx::Sqlite,
    connect,
    sql_common::Dialect {
        text: "TEXT",
        serial_pk: "INTEGER PRIMARY KEY AUTOINCREMENT",
        placeholder: sql_common::question,
    }
);
