// `Json<T>` is stored as its `T`: a `T` without serde is named in the error, not the wrapper.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

pub struct Json<T>(pub T);

pub struct Receipt {
    pub order_id: u64,
}

#[idempotent(key = "order_id")]
async fn receipt(order_id: u64) -> Result<Json<Receipt>, AppError> {
    Ok(Json(Receipt { order_id }))
}

fn main() {
    let _ = receipt(1);
}
