use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[derive(Debug)]
enum MyError {
    OutOfStock,
}

#[idempotent(key = "order_id")]
async fn reserve(order_id: u64) -> Result<u64, MyError> {
    if order_id == 0 {
        return Err(MyError::OutOfStock);
    }
    Ok(order_id)
}
fn main() {}
