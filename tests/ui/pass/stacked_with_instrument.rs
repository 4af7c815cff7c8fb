use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// `instrument` above: the span covers duplicates too.
#[tracing::instrument(skip(user))]
#[idempotent(key = "order_id", ttl = "30s")]
async fn above(order_id: u64, user: String) -> Result<String, AppError> {
    tracing::info!("issuing");
    Ok(user)
}

/// `instrument` below: the span covers only the runs of the body.
#[idempotent(key = "order_id", ttl = "30s")]
#[tracing::instrument(err)]
async fn below(order_id: u64) -> Result<u64, AppError> {
    Ok(order_id)
}

#[derive(Debug)]
struct Service;

impl Service {
    #[tracing::instrument(skip(self))]
    #[idempotent(key = "order_id", scope = "tests.method")]
    async fn method(&self, order_id: u64) -> Result<(), AppError> {
        let _ = order_id;
        Ok(())
    }
}

fn main() {
    let _ = above(1, "ann".into());
    let _ = below(1);
    let _ = Service.method(1);
}
