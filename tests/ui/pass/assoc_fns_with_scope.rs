//! With a `scope`, associated fns compile wherever they are: trait impls, inherent and generic
//! impls, default methods, impls written by `macro_rules!`. Free fns need none, also when nested
//! in another fn's body or written by a macro.
use idem_runtime::idempotent;
use std::marker::PhantomData;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Job {
    async fn run(id: u64) -> Result<String, AppError>;

    #[idempotent(key = "id", scope = "jobs.describe")]
    async fn describe(id: u64) -> Result<String, AppError> {
        Ok(format!("job {id}"))
    }
}

struct Charge;

impl Job for Charge {
    #[idempotent(key = "id", scope = "jobs.charge")]
    async fn run(id: u64) -> Result<String, AppError> {
        Ok(format!("charged order {id}"))
    }
}

impl Charge {
    #[idempotent(key = "id", scope = "jobs.charge.retry")]
    async fn retry(id: u64) -> Result<String, AppError> {
        Ok(format!("charged order {id} again"))
    }
}

trait Currency {
    const CODE: &'static str;
}

struct Payout<C>(PhantomData<C>);

impl<C: Currency> Payout<C> {
    #[idempotent(key = "{id}:{currency}", scope = "jobs.payout")]
    async fn send(id: u64, currency: &str) -> Result<String, AppError> {
        Ok(format!("paid {id} in {currency} ({})", C::CODE))
    }
}

struct Usd;
impl Currency for Usd {
    const CODE: &'static str = "USD";
}

macro_rules! job {
    ($ty:ident, $scope:literal) => {
        struct $ty;

        impl $ty {
            #[idempotent(key = "id", scope = $scope)]
            async fn run(id: u64) -> Result<u64, AppError> {
                Ok(id)
            }
        }
    };
}

job!(Refund, "jobs.refund");

macro_rules! free_handler {
    ($name:ident) => {
        #[idempotent(key = "id")]
        async fn $name(id: u64) -> Result<u64, AppError> {
            Ok(id)
        }
    };
}

free_handler!(from_macro);

#[idempotent(key = "id")]
async fn free(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

fn main() {
    let _ = Charge::run(1);
    let _ = Charge::describe(1);
    let _ = Charge::retry(1);
    let _ = Payout::<Usd>::send(1, "USD");
    let _ = Refund::run(1);
    let _ = from_macro(1);
    let _ = free(1);

    // A fn in a block is a free fn too (its default scope is its module path and name).
    #[idempotent(key = "id")]
    async fn nested(id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
    let _ = nested(1);
}
