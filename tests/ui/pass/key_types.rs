use idem_runtime::idempotent;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "id")]
async fn owned_string(id: String) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "id")]
async fn borrowed_str(id: &str) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "id")]
async fn wide_integer(id: u128) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "id")]
async fn uuid_bytes(id: [u8; 16]) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "id")]
async fn shared(id: Arc<str>) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "{a}{b}{c}{d}")]
async fn mixed(a: i64, b: char, c: bool, d: &String) -> Result<(), AppError> {
    let _ = (a, b, c, d);
    Ok(())
}

fn main() {
    let _ = owned_string("k".into());
    let _ = borrowed_str("k");
    let _ = wide_integer(1);
    let _ = uuid_bytes([0; 16]);
    let _ = shared(Arc::from("k"));
    let d = String::from("d");
    let _ = mixed(-1, 'c', true, &d);
}
