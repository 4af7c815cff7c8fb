use idem_runtime::{MemoryStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

fn assert_send<T: Send>(_: T) {}

#[idempotent(key = "order_id", ttl = "10m")]
async fn issue_coupon(order_id: u64, user: String) -> Result<String, AppError> {
    tokio::task::yield_now().await;
    Ok(format!("{order_id}-{user}"))
}

struct Service {
    idem: MemoryStore,
}

impl Service {
    #[idempotent(key = "{tenant}:{order_id}", store = "self.idem", fingerprint = "user", scope = "tests.issue")]
    async fn issue(&self, tenant: &str, order_id: u64, user: String) -> Result<String, AppError> {
        tokio::task::yield_now().await;
        Ok(format!("{tenant}-{order_id}-{user}"))
    }
}

fn main() {
    assert_send(issue_coupon(1, "ann".into()));
    let svc = Service {
        idem: MemoryStore::new(),
    };
    assert_send(svc.issue("acme", 1, "ann".into()));
    // Spawnable on a multi-threaded runtime.
    let _ = || tokio::spawn(issue_coupon(2, "bob".into()));
}
