//! The layered store, Redis in front of PostgreSQL (`REDIS_URL`, default `redis://127.0.0.1:6379`;
//! `POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`): the whole conformance
//! suite. Skipped loudly without a server, failed under CI.
mod redis_support;
mod support;

use idem_runtime::{LayeredStore, PgStore, RedisStore};

static MISSING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn postgres() -> Option<PgStore> {
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
        Ok(pool) => {
            let store = PgStore::new(pool);
            store.migrate().await.unwrap();
            Some(store)
        }
        Err(e) => {
            // Remembered, so the other checks skip at once instead of timing out one by one.
            let _ = MISSING.set(e.to_string());
            support::server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

async fn layered() -> Option<LayeredStore<RedisStore, PgStore>> {
    let front = redis_support::shared_store().await?;
    let durable = postgres().await?;
    Some(LayeredStore::new(front, durable))
}

idem_runtime::store_conformance!(layered());
idem_runtime::operations_conformance!(layered());
