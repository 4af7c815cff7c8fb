use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Service {
    idem: idem_runtime::MemoryStore,
    count: u64,
}

impl Service {
    fn bump(&mut self) {
        self.count += 1;
    }

    #[idempotent(key = "order_id", store = "self.idem", scope = "tests.handle")]
    async fn handle(&mut self, order_id: u64) -> Result<u64, AppError> {
        // The whole of `self` is borrowed mutably while the store in `self` is in use.
        self.bump();
        Ok(order_id)
    }
}

fn main() {}
