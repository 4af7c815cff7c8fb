use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Counter {
    count: u64,
}

impl Counter {
    #[idempotent(key = "order_id", scope = "tests.bump")]
    async fn bump(&mut self, order_id: u64) -> Result<u64, AppError> {
        self.count += order_id;
        Ok(self.count)
    }

    /// By value is fine as long as the store does not live in `self`.
    #[idempotent(key = "order_id", scope = "tests.consume")]
    async fn consume(self, order_id: u64) -> Result<u64, AppError> {
        Ok(self.count + order_id)
    }
}

fn main() {
    let mut c = Counter { count: 0 };
    let _ = c.bump(1);
    let _ = c.consume(1);
}
