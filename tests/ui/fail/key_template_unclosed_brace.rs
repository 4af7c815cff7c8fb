use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "{tenant}:{order_id")]
async fn handle(tenant: &str, order_id: u64) -> Result<(), AppError> {
    let _ = (tenant, order_id);
    Ok(())
}
fn main() {}
