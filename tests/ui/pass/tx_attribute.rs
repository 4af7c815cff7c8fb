//! The transactional form: the transaction is a parameter, the done mark is written in it, and
//! the caller commits. Works with a `Transaction`, a connection in a transaction, methods, other
//! parameters borrowed or moved, and an explicit store.
use idem_runtime::sqlx::{self, Sqlite, SqliteConnection, Transaction};
use idem_runtime::{SqliteStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn assert_send<T: Send>(_: T) {}

#[idempotent(key = "order_id", ttl = "30s", tx = "tx")]
async fn issue_coupon(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
    user: &str,
) -> Result<String, AppError> {
    let code = format!("C-{order_id}-{user}");
    sqlx::query("INSERT INTO coupons (order_id, code) VALUES (?, ?)")
        .bind(order_id)
        .bind(&code)
        .execute(&mut **tx)
        .await?;
    if order_id < 0 {
        return Err(AppError::Idem(idem_runtime::Error::InvalidKey { reason: "negative" }));
    }
    Ok(code)
}

#[idempotent(key = "order_id", tx = "conn")]
async fn on_connection(conn: &mut SqliteConnection, order_id: i64) -> Result<(), AppError> {
    sqlx::query("DELETE FROM coupons WHERE order_id = ?")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

struct Billing {
    idem: SqliteStore,
}

impl Billing {
    #[idempotent(key = "invoice", tx = "tx", store = "self.idem", fingerprint = "cents", scope = "tests.charge")]
    async fn charge(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        invoice: String,
        cents: u32,
    ) -> Result<u32, AppError> {
        sqlx::query("INSERT INTO charges (invoice, cents) VALUES (?, ?)")
            .bind(invoice) // moved into the query
            .bind(cents)
            .execute(&mut **tx)
            .await?;
        Ok(cents)
    }
}

#[idempotent(key = "order_id", tx = "tx", store = "store")]
async fn store_param(
    store: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
) -> Result<i64, AppError> {
    let _ = store.table();
    Ok(order_id)
}

async fn caller(pool: sqlx::SqlitePool, billing: Billing) -> Result<(), AppError> {
    let mut tx = pool.begin().await?;
    issue_coupon(&mut tx, 1, "ann").await?;
    on_connection(&mut tx, 1).await?;
    billing.charge(&mut tx, "inv-1".into(), 500).await?;
    store_param(&billing.idem, &mut tx, 2).await?;
    tx.commit().await?;
    Ok(())
}

// Spawnable: the caller's future is `Send`.
fn _spawnable(pool: sqlx::SqlitePool, billing: Billing) {
    assert_send(caller(pool, billing));
}

fn main() {}
