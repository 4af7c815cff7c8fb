//! Scratch SQL set-up of the single-scenario tests: the error type of handlers that write through
//! sqlx, a pool on the shared server (or a loud skip), and dropping the test's tables after.
//! Included by path (`#[path = "support/sql.rs"] mod sql;`) only by the tests crate's binaries,
//! whose features it names.
#![allow(dead_code, unreachable_pub)]

use idem_runtime::Error;
use idem_runtime::sqlx::{self, AssertSqlSafe};

/// What a handler that writes through sqlx returns: idem's errors and the database's.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A pool of `max` connections on the shared PostgreSQL (`POSTGRES_URL`), or `None` after
/// reporting it missing (a failure under CI).
#[cfg(feature = "postgres")]
pub async fn postgres(max: u32) -> Option<sqlx::PgPool> {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect(&url)
        .await;
    pool.map_err(|e| crate::support::server_missing("PostgreSQL", &url, e))
        .ok()
}

/// A pool of `max` connections on the shared MySQL/MariaDB (`MYSQL_URL`), or `None` after
/// reporting it missing (a failure under CI).
#[cfg(feature = "mysql")]
pub async fn mysql(max: u32) -> Option<sqlx::MySqlPool> {
    let url = std::env::var("MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(max)
        .connect(&url)
        .await;
    pool.map_err(|e| crate::support::server_missing("MySQL", &url, e))
        .ok()
}

/// The statements that drop the test's own tables and idem's table `table` (with its migrations).
pub fn drop_tables(table: &str, own: &[&str]) -> AssertSqlSafe<String> {
    let mut sql = String::new();
    for t in own
        .iter()
        .copied()
        .chain([table, &format!("{table}_migrations")])
    {
        sql.push_str(&format!("DROP TABLE IF EXISTS {t};"));
    }
    AssertSqlSafe(sql)
}
