use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "id", wait = "5s")]
async fn waits(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = "id", scope = "billing::charge")]
async fn scoped(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

#[idempotent(key = "id", keep = "7d")]
async fn kept(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

/// Options over several lines, with a trailing comma.
#[rustfmt::skip]
#[idempotent(
    key = "id",
    ttl = "1h30m",
    keep = "30d",
    wait = "500ms",
    scope = "billing::refund",
)]
async fn everything(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {
    let _ = waits(1);
    let _ = scoped(1);
    let _ = kept(1);
    let _ = everything(1);
}
