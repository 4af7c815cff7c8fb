use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct OrderId(u64);

#[idempotent(key = "pair.0")]
async fn by_tuple(pair: (u64, String)) -> Result<String, AppError> {
    Ok(pair.1)
}

#[idempotent(key = "id.0")]
async fn by_newtype(id: OrderId) -> Result<u64, AppError> {
    Ok(id.0)
}

#[idempotent(key = "{pair.1}:{pair.0}")]
async fn both(pair: (u64, String)) -> Result<(), AppError> {
    let _ = pair;
    Ok(())
}

fn main() {
    let _ = by_tuple((1, "x".into()));
    let _ = by_newtype(OrderId(1));
    let _ = both((1, "x".into()));
}
