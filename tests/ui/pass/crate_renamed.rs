extern crate idem_runtime as idem;

use idem::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem::Error),
}

#[idempotent(key = "{tenant}:{order_id}", crate = "idem", fingerprint = "order_id")]
async fn issue(tenant: &str, order_id: u64) -> Result<u64, AppError> {
    let _ = tenant;
    Ok(order_id)
}

#[idempotent(key = "order_id", crate = "::idem_runtime")]
async fn absolute(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

fn main() {
    let _ = issue("acme", 1);
    let _ = absolute(1);
}
