use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id")]
async fn handle(order_id: u64) -> u32 {
    order_id as u32
}
fn main() {}
