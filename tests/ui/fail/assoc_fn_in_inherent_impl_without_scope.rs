// `Charge::run` and `Refund::run` in one module would share the default scope (module path and
// fn name): one's record would answer the other's call.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Charge;

impl Charge {
    #[idempotent(key = "id", ttl = "10m")]
    async fn run(id: u64) -> Result<String, AppError> {
        Ok(format!("charged order {id}"))
    }
}

fn main() {
    let _ = Charge::run(7);
}
