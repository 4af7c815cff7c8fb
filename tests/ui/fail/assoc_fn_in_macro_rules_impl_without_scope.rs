// An impl written by a `macro_rules!` macro, once per type: the associated fns of all the types
// would share the default scope.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

macro_rules! job {
    ($ty:ident, $verb:literal) => {
        struct $ty;

        impl $ty {
            #[idempotent(key = "id")]
            async fn run(id: u64) -> Result<String, AppError> {
                Ok(format!("{} order {id}", $verb))
            }
        }
    };
}

job!(Charge, "charged");
job!(Refund, "refunded");

fn main() {
    let _ = Charge::run(7);
    let _ = Refund::run(7);
}
