// Two impls of one trait in one module: with the default scope (module path and fn name)
// `Charge::run` and `Refund::run` would share one key space, and `Refund::run(7)` would replay
// "charged order 7" without running. An associated fn names its scope.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Job {
    async fn run(id: u64) -> Result<String, AppError>;
}

struct Charge;
struct Refund;

impl Job for Charge {
    #[idempotent(key = "id")]
    async fn run(id: u64) -> Result<String, AppError> {
        Ok(format!("charged order {id}"))
    }
}

// With a scope, the same fn compiles.
impl Job for Refund {
    #[idempotent(key = "id", scope = "jobs.refund")]
    async fn run(id: u64) -> Result<String, AppError> {
        Ok(format!("refunded order {id}"))
    }
}

fn main() {
    let _ = Charge::run(7);
    let _ = Refund::run(7);
}
