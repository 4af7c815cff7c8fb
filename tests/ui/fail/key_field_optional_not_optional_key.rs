// Review rev1: an `Option` field keyed by accident (a message whose id an older producer may
// leave out). As a template part it is refused (only `OptionalKey` types are optional there, "where
// one missing part would otherwise silently turn deduplication off"); as the whole key it
// compiles, and every message without the id runs unkeyed: each redelivery runs it again, and
// the broker glue acks it (no report, handler ok). It must be refused the same way (or need an
// explicit opt-in such as `OptionalKey` or an `optional` argument).
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
async fn issue_coupon(msg: &OrderPaid) -> Result<(), AppError> {
    let _ = msg;
    Ok(())
}

fn main() {}
