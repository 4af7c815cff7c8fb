use idem_runtime::{KeyPart, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "id", scope = "tests.notify")]
async fn notify(id: impl KeyPart, text: impl AsRef<str>) -> Result<usize, AppError> {
    let _ = id;
    Ok(text.as_ref().len())
}

fn main() {
    let _ = notify(7u32, "hello");
}
