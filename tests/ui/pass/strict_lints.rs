//! Every form compiles under a strict lint set in the user's crate: the expansion drops no
//! result (`KeyBuilder::lit` and `part` return `&mut Self`), qualifies nothing needlessly, casts
//! nothing, and adds no public item to document.
#![deny(
    unused_results,
    unused_qualifications,
    unused_import_braces,
    trivial_casts,
    unused_extern_crates,
    missing_docs,
    clippy::all
)]
#![forbid(unsafe_code)]

use idem_runtime::sqlx::{Sqlite, Transaction};
use idem_runtime::{MemoryStore, SqliteStore, idempotent};

/// The handlers' error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// idem's own.
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// An order.
pub struct Order {
    /// Its id.
    pub id: u64,
    /// Its amount.
    pub cents: u32,
}

/// The plain form, default store.
#[idempotent(key = "order_id", ttl = "10m", keep = "1d", wait = "5s")]
pub async fn plain(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

/// A template key, a fingerprint, a store expression.
#[idempotent(
    key = "order-{tenant}/{order.id}{{x}}",
    fingerprint = "order.cents, tenant",
    store = "store",
    max_lease = "forever",
    max_output = "64KiB"
)]
pub async fn template(store: &MemoryStore, tenant: &str, order: Order) -> Result<u32, AppError> {
    let _ = tenant;
    Ok(order.cents)
}

/// The transactional form.
#[idempotent(
    key = "{order_id}:{order_id}",
    tx = "tx",
    store = "store",
    fingerprint = "order_id"
)]
pub async fn transactional(
    store: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
) -> Result<i64, AppError> {
    let _ = store;
    Ok(order_id)
}

/// A service.
pub struct Service {
    idem: MemoryStore,
    name: String,
}

impl Service {
    /// A method with a scope, its store in `self`.
    #[idempotent(key = "{self.name}:{id}", store = "self.idem", scope = "tests.method")]
    pub async fn method(&self, id: u64) -> Result<String, AppError> {
        Ok(format!("{}-{id}", self.name))
    }

    /// An associated fn with a scope.
    #[idempotent(key = "id", scope = "tests.assoc")]
    pub async fn assoc(id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

/// Calls each form once.
pub async fn call_all(
    store: &MemoryStore,
    sql: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    svc: &Service,
) -> Result<(), AppError> {
    let _ = plain(1).await?;
    let _ = template(store, "acme", Order { id: 1, cents: 5 }).await?;
    let _ = transactional(sql, tx, 1).await?;
    let _ = svc.method(1).await?;
    let _ = Service::assoc(1).await?;
    Ok(())
}

fn main() {
    let _ = Service {
        idem: MemoryStore::new(),
        name: String::new(),
    };
    let _ = call_all;
}
