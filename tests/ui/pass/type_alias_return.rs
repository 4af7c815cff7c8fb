use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error("parse: {0}")]
    Parse(#[from] std::num::ParseIntError),
}

type Res<T> = Result<T, AppError>;

/// A `Result` alias, and `?` converting another error in the body.
#[idempotent(key = "id")]
async fn parse(id: u64, text: &str) -> Res<u64> {
    let n: u64 = text.parse()?;
    Ok(id + n)
}

/// A boxed error absorbs idem's through `From` too.
#[idempotent(key = "id")]
async fn boxed(id: u64) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    Ok(id)
}

fn main() {
    let _ = parse(1, "2");
    let _ = boxed(1);
}
