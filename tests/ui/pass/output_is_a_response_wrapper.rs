// A web handler's response wrapper (axum's `Json<T>`, or `(StatusCode, Json<T>)`): idem stores
// and replays the `T` inside (and the status as a number), and wraps it again.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Json<T>(T);

struct StatusCode(u16);

impl StatusCode {
    const INTERNAL_SERVER_ERROR: StatusCode = StatusCode(500);
    fn as_u16(&self) -> u16 {
        self.0
    }
    fn from_u16(code: u16) -> Result<StatusCode, ()> {
        Ok(StatusCode(code))
    }
}

#[idempotent(key = "order_id")]
async fn receipt(order_id: u64) -> Result<Json<u64>, AppError> {
    Ok(Json(order_id))
}

#[idempotent(key = "order_id")]
async fn created(order_id: u64) -> Result<(StatusCode, Json<u64>), AppError> {
    Ok((StatusCode(201), Json(order_id)))
}

fn main() {
    let _ = receipt(1);
    let _ = created(1);
}
