use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", max_output = "2MB")]
async fn report(order_id: u64) -> Result<Vec<u8>, AppError> {
    Ok(vec![0; order_id as usize])
}

fn main() {}
