// An `Option` of a type that is not an `OptionalKey`: a message whose `order_id` is `None` by
// accident must not be processed once per delivery, so it is no key.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

pub struct OrderPaid {
    pub order_id: Option<u64>,
}

#[idempotent(key = "msg.order_id")]
async fn handle(msg: OrderPaid) -> Result<(), AppError> {
    let _ = msg;
    Ok(())
}
fn main() {}
