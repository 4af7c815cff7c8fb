// A default method is the same fn in every implementing type: with the default scope (module path
// and fn name) `Charge::run(7)` and `Refund::run(7)` would share one record.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Job {
    const NAME: &'static str;

    #[idempotent(key = "id")]
    async fn run(id: u64) -> Result<String, AppError> {
        Ok(format!("{} order {id}", Self::NAME))
    }
}

struct Charge;
impl Job for Charge {
    const NAME: &'static str = "charged";
}

fn main() {
    let _ = Charge::run(7);
}
