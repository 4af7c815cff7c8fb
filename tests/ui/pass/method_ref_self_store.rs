use idem_runtime::{MemoryStore, Store, idempotent};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Service {
    idem: MemoryStore,
    shared: Arc<MemoryStore>,
    name: String,
    issued: AtomicU32,
}

impl Service {
    #[idempotent(key = "order_id", store = "self.idem", scope = "tests.issue")]
    async fn issue(&self, order_id: u64) -> Result<u32, AppError> {
        let _ = order_id;
        Ok(self.issued.fetch_add(1, Ordering::SeqCst))
    }

    /// The receiver can be part of the key too, and the store can be an `Arc`.
    #[idempotent(key = "{self.name}:{order_id}", store = "self.shared", scope = "tests.named")]
    async fn named(&self, order_id: u64) -> Result<(), AppError> {
        let _ = order_id;
        Ok(())
    }
}

/// A store passed as a parameter.
#[idempotent(key = "order_id", store = "store")]
async fn with_store(store: &MemoryStore, order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

/// A trait object passed by reference.
#[idempotent(key = "order_id", store = "store")]
async fn with_dyn_store(store: &dyn Store, order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

/// A generic store, and a store returned by value from a call (a temporary).
#[idempotent(key = "order_id", store = "store")]
async fn with_generic_store<S: Store>(store: &S, order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

fn shared_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

#[idempotent(key = "order_id", store = "shared_store()")]
async fn with_temporary_store(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

/// The default store, named explicitly.
#[idempotent(key = "order_id", store = "idem_runtime::DefaultStore")]
async fn with_default_store(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

fn main() {
    let svc = Service {
        idem: MemoryStore::new(),
        shared: Arc::new(MemoryStore::new()),
        name: "svc".into(),
        issued: AtomicU32::new(0),
    };
    let _ = svc.issue(1);
    let _ = svc.named(1);
    let store = MemoryStore::new();
    let _ = with_store(&store, 1);
    let _ = with_dyn_store(&store, 1);
    let _ = with_generic_store(&store, 1);
    let _ = with_temporary_store(1);
    let _ = with_default_store(1);
}
