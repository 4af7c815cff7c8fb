use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", tx = "log")]
async fn issue(log: &mut Vec<String>, order_id: i64) -> Result<(), AppError> {
    log.push(order_id.to_string());
    Ok(())
}

fn main() {}
