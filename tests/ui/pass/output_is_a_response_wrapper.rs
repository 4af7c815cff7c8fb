// Returning a response wrapper (an extractor type such as axum's `Json<T>`): idem stores and
// replays `T`; the note says to return `T` and wrap it outside.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Json<T>(T);

#[idempotent(key = "order_id")]
async fn receipt(order_id: u64) -> Result<Json<u64>, AppError> {
    Ok(Json(order_id))
}

fn main() {
    let _ = receipt(1);
}
