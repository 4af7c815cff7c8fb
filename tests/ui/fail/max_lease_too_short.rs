use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", ttl = "30s", max_lease = "500ms")]
async fn ship(order_id: u64) -> Result<(), AppError> {
    let _ = order_id;
    Ok(())
}

fn main() {}
