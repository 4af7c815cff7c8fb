use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "{tenant}:{}")]
async fn handle(tenant: String, order_id: u64) -> Result<u64, AppError> {
    let _ = tenant;
    Ok(order_id)
}
fn main() {}
