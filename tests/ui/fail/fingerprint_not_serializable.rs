use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Payload {
    amount: u64,
}

#[idempotent(key = "request_id", fingerprint = "payload")]
async fn charge(request_id: String, payload: Payload) -> Result<u64, AppError> {
    let _ = request_id;
    Ok(payload.amount)
}
fn main() {}
