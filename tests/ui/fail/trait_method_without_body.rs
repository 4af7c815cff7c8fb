use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Handler {
    #[idempotent(key = "order_id", scope = "tests.handle")]
    async fn handle(&self, order_id: u64) -> Result<u64, AppError>;
}
fn main() {}
