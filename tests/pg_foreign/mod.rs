//! What the tests of the transactional form on another PostgreSQL library share: the idem
//! store and the effects table (set up through idem's own sqlx), counting effect rows, and
//! cleaning up. Included by path by `pg_foreign_tokio.rs` and `pg_foreign_sqlx08.rs`.
#![allow(dead_code, unreachable_pub)]

use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{PgStore, Token};

/// The database URL the test's own library connects with (`POSTGRES_URL`).
pub fn url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// One test's tables: idem's (unique) and the effects table, where each run of a handler
/// writes one row.
pub struct Setup {
    pub pool: sqlx::PgPool,
    pub store: PgStore,
    pub table: String,
    pub effects: String,
}

impl Setup {
    /// `None` after reporting the server missing (a failure under CI).
    pub async fn new(tag: &str) -> Option<Setup> {
        let pool = crate::sql::postgres(4).await?;
        let suffix = Token::generate().to_hex();
        let table = format!("idem_{tag}_{suffix}");
        let effects = format!("effects_{tag}_{suffix}");
        let store = PgStore::with_table(pool.clone(), &table).unwrap();
        store.migrate().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {effects} (id BIGSERIAL PRIMARY KEY, msg_key TEXT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        Some(Setup {
            pool,
            store,
            table,
            effects,
        })
    }

    /// The statement a handler runs for its effect (`$1`: the message key).
    pub fn insert(&self) -> String {
        format!("INSERT INTO {} (msg_key) VALUES ($1)", self.effects)
    }

    /// The effect rows of `key`, as committed.
    pub async fn effects_of(&self, key: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE msg_key = $1",
            self.effects
        )))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// idem's rows for `key` (any state), as committed.
    pub async fn marks_of(&self, key: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE idem_key = $1 AND state = 2",
            self.table
        )))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn drop_tables(self) {
        sqlx::raw_sql(crate::sql::drop_tables(&self.table, &[&self.effects]))
            .execute(&self.pool)
            .await
            .unwrap();
    }
}
