use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "request_id", fingerprint = "amount,,currency")]
async fn charge(request_id: String, amount: u64, currency: String) -> Result<u64, AppError> {
    let _ = (request_id, currency);
    Ok(amount)
}
fn main() {}
