// Review rev1: one mistake (a struct without the serde derives) must be answered by one error
// (tests/ui/main.rs: "every mistake ... must be answered by one error"), as before the change; the
// expected output is the one of f4af757.
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
