// An app on sqlx 0.8 (named `sqlx08` here; in an app it is its `sqlx`), with idem-runtime built
// without its feature `sqlx-0-8`: idem is on sqlx 0.9, so rustc sees two `Transaction` types of
// two versions of `sqlx_core`, and the note must say which feature takes this one.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "order_id", tx = "tx")]
async fn issue(
    tx: &mut sqlx08::Transaction<'_, sqlx08::Postgres>,
    order_id: i64,
) -> Result<(), AppError> {
    let _ = (tx, order_id);
    Ok(())
}

fn main() {}
