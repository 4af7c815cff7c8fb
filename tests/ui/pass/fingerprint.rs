use idem_runtime::idempotent;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
}

#[idempotent(key = "request_id", fingerprint = "amount, currency")]
async fn charge(request_id: String, amount: u64, currency: &str) -> Result<u64, AppError> {
    let _ = (request_id, currency);
    Ok(amount)
}

#[idempotent(key = "p.id", fingerprint = "p.amount,p.currency")]
async fn charge_fields(p: Payment) -> Result<u64, AppError> {
    Ok(p.amount)
}

#[idempotent(key = "p.id", fingerprint = "p")]
async fn charge_whole(p: &Payment) -> Result<(), AppError> {
    Ok(())
}

fn main() {
    let _ = charge("r".into(), 1, "EUR");
    let p = Payment {
        id: "r".into(),
        amount: 1,
        currency: "EUR".into(),
    };
    let _ = charge_whole(&p);
    let _ = charge_fields(p);
}
