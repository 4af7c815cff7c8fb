use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Coupon {
    code: String,
}

#[idempotent(key = "order_id")]
async fn issue_coupon(order_id: u64) -> Result<Coupon, AppError> {
    Ok(Coupon {
        code: order_id.to_string(),
    })
}
fn main() {}
