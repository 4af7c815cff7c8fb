// An `Option` key still refuses a float by name.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "amount")]
async fn handle(amount: Option<f64>) -> Result<(), AppError> {
    let _ = amount;
    Ok(())
}
fn main() {}
