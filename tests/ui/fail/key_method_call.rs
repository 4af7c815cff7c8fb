use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "msg.id()")]
async fn handle(msg: String) -> Result<(), AppError> {
    let _ = msg;
    Ok(())
}
fn main() {}
