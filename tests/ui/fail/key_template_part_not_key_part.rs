use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "{tenant}:{amount}")]
async fn handle(tenant: String, amount: f64) -> Result<(), AppError> {
    let _ = (tenant, amount);
    Ok(())
}

fn main() {}
