// A template's part cannot be optional: the key would change its shape when it is missing.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "{tenant}:{id}")]
async fn handle(tenant: &str, id: Option<u64>) -> Result<(), AppError> {
    let _ = (tenant, id);
    Ok(())
}
fn main() {}
