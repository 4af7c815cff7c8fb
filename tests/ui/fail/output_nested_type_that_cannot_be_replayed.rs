// A type without serde nested in the output (`Json<Vec<Receipt>>`): the error names `Receipt`.
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
async fn receipts(order_id: u64) -> Result<Json<Vec<Receipt>>, AppError> {
    Ok(Json(vec![Receipt { order_id }]))
}

fn main() {
    let _ = receipts(1);
}
