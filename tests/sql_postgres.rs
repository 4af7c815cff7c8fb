//! The SQL store on PostgreSQL (`POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`):
//! the whole conformance suite, migrations, purge, the transactional mode, and several worker
//! processes (racing, and killed with SIGKILL). Skipped loudly without a server, failed under CI.
mod sql_common;
mod support;

static MISSING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn connect() -> Option<idem_runtime::sqlx::PgPool> {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    if let Some(e) = MISSING.get() {
        support::server_missing("PostgreSQL", &url, e);
        return None;
    }
    let pool = idem_runtime::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await;
    match pool {
        Ok(pool) => Some(pool),
        Err(e) => {
            // Remembered, so the other tests skip at once instead of timing out one by one.
            let _ = MISSING.set(e.to_string());
            support::server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

crate::sql_store_tests!(
    idem_runtime::sqlx::Postgres,
    connect,
    sql_common::Dialect {
        text: "TEXT",
        serial_pk: "BIGSERIAL PRIMARY KEY",
        placeholder: sql_common::dollar,
    }
);
