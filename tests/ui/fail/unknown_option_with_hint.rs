use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", lease = "30s")]
async fn handle(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}
fn main() {}
