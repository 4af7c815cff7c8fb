use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Message {
    order_id: u64,
}

#[idempotent(key = "msg.order")]
async fn handle(msg: Message) -> Result<u64, AppError> {
    Ok(msg.order_id)
}
fn main() {}
