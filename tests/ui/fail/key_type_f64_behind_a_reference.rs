// Review rev1: a float is refused as a key (its `Display` is not a key: `0.1 + 0.2`, `-0.0`,
// `NaN`), also behind a reference or a box: the float tier matches `f32`/`f64` only, so `&f64`
// and `Box<f64>` fall through to the `Display` tier and are keyed by their text.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "amount")]
async fn by_ref(amount: &f64) -> Result<(), AppError> {
    let _ = amount;
    Ok(())
}

#[idempotent(key = "amount")]
async fn boxed(amount: Box<f32>) -> Result<(), AppError> {
    let _ = amount;
    Ok(())
}

#[idempotent(key = "amount")]
async fn optional_ref(amount: Option<&f64>) -> Result<(), AppError> {
    let _ = amount;
    Ok(())
}

fn main() {}
