//! `#[idempotent]` on the methods of an `#[async_trait]` impl (and a default method of an
//! `#[async_trait]` trait): async-trait rewrites each `async fn` into a fn returning
//! `Pin<Box<dyn Future<Output = R> + Send>>` before the attribute runs, and the attribute wraps
//! the future's body.
use async_trait::async_trait;
use idem_runtime::sqlx::{Sqlite, Transaction};
use idem_runtime::{MemoryStore, SqliteStore, idempotent};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[derive(serde::Serialize)]
struct Order {
    id: u64,
    cents: u32,
}

#[async_trait]
trait Handler: Send + Sync {
    async fn handle(&self, id: u64) -> Result<String, AppError>;
    async fn by_order(&self, tenant: &str, order: Order) -> Result<u32, AppError>;
    async fn bump(&mut self, id: u64) -> Result<u64, AppError>;
    async fn in_tx(
        &self,
        store: &SqliteStore,
        tx: &mut Transaction<'_, Sqlite>,
        id: i64,
    ) -> Result<i64, AppError>;
    async fn assoc(store: &MemoryStore, id: u64) -> Result<u64, AppError>
    where
        Self: Sized;

    #[idempotent(key = "id", store = "self.store()", scope = "tests.default_method")]
    async fn default_method(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }

    fn store(&self) -> &MemoryStore;
}

struct Service {
    idem: MemoryStore,
    shared: Arc<MemoryStore>,
    name: String,
    count: u64,
}

#[async_trait]
impl Handler for Service {
    #[idempotent(key = "id", store = "self.idem", ttl = "10s", scope = "tests.handle")]
    async fn handle(&self, id: u64) -> Result<String, AppError> {
        tokio::task::yield_now().await;
        Ok(format!("{}-{id}", self.name))
    }

    /// A template with `self`, a fingerprint over a field, a by-value parameter, an `Arc` store.
    #[idempotent(
        key = "{self.name}:{tenant}:{order.id}",
        store = "self.shared",
        fingerprint = "order.cents",
        scope = "tests.by_order"
    )]
    async fn by_order(&self, tenant: &str, order: Order) -> Result<u32, AppError> {
        let _ = tenant;
        Ok(order.cents)
    }

    #[idempotent(key = "id", scope = "tests.bump")]
    async fn bump(&mut self, id: u64) -> Result<u64, AppError> {
        self.count += id;
        Ok(self.count)
    }

    /// The transactional form.
    #[idempotent(key = "id", tx = "tx", store = "store", scope = "tests.in_tx")]
    async fn in_tx(
        &self,
        store: &SqliteStore,
        tx: &mut Transaction<'_, Sqlite>,
        id: i64,
    ) -> Result<i64, AppError> {
        let _ = (store, &self.name);
        Ok(id)
    }

    #[idempotent(key = "id", store = "store", scope = "tests.assoc")]
    async fn assoc(store: &MemoryStore, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }

    fn store(&self) -> &MemoryStore {
        &self.idem
    }
}

/// `?Send`: the boxed future is not `Send`.
#[async_trait(?Send)]
trait Local {
    async fn local(&self, id: u64) -> Result<u64, AppError>;
}

#[async_trait(?Send)]
impl Local for Service {
    #[idempotent(key = "id", store = "self.idem", scope = "tests.local")]
    async fn local(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

fn main() {
    let svc = Service {
        idem: MemoryStore::new(),
        shared: Arc::new(MemoryStore::new()),
        name: "svc".into(),
        count: 0,
    };
    let dynamic: &dyn Handler = &svc;
    let _ = dynamic.handle(1);
    let _ = dynamic.by_order("acme", Order { id: 1, cents: 5 });
    let _ = dynamic.default_method(1);
    let _ = Service::assoc(&svc.idem, 1);
    let _ = svc.local(1);
    let mut svc = svc;
    let _ = svc.bump(1);
}
