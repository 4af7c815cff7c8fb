use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "ordr_id")]
async fn issue_coupon(order_id: u64, user: u32) -> Result<u32, AppError> {
    Ok(user + order_id as u32)
}
fn main() {}
