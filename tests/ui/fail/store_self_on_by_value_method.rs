use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Service {
    idem: idem_runtime::MemoryStore,
}

impl Service {
    #[idempotent(key = "order_id", store = "self.idem", scope = "tests.handle")]
    async fn handle(self, order_id: u64) -> Result<u64, AppError> {
        Ok(order_id)
    }
}
fn main() {}
