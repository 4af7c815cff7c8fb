// A body that ends without its `Result` (here: only a comment) is one error on the body, as for
// any fn, not a complaint about the return type.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id")]
async fn issue_coupon(order_id: u64) -> Result<u64, AppError> {
    // ... your code ...
}

fn main() {
    let _ = issue_coupon(1);
}
