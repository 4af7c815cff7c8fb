use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", ttl = "10m")]
async fn issue_coupon(order_id: u64, user: u32) -> Result<String, AppError> {
    Ok(format!("coupon-{order_id}-{user}"))
}

#[idempotent(key = "order_id")]
async fn returns_unit(order_id: u64) -> Result<(), AppError> {
    let _ = order_id;
    Ok(())
}

fn main() {
    let _ = issue_coupon(1, 2);
    let _ = returns_unit(1);
}
