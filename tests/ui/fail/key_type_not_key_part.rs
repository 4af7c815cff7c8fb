use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Order {
    id: u64,
}

#[idempotent(key = "order")]
async fn handle(order: Order) -> Result<u64, AppError> {
    Ok(order.id)
}
fn main() {}
