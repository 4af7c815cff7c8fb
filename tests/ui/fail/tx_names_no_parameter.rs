use idem_runtime::idempotent;
use idem_runtime::sqlx::{Sqlite, Transaction};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", tx = "txn")]
async fn issue(tx: &mut Transaction<'_, Sqlite>, order_id: i64) -> Result<(), AppError> {
    let _ = (tx, order_id);
    Ok(())
}

fn main() {}
