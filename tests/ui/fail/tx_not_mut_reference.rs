// The transaction must stay the caller's: a `&mut` to it, which idem hands back to write the
// done mark in it, and which the caller commits.
use idem_runtime::idempotent;
use idem_runtime::sqlx::{Sqlite, Transaction};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", tx = "tx")]
async fn issue(tx: Transaction<'static, Sqlite>, order_id: i64) -> Result<(), AppError> {
    let _ = (tx, order_id);
    Ok(())
}

fn main() {}
