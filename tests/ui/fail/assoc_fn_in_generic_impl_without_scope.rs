// The fn has no generics of its own, but its impl does: `Payout::<Usd>::send(9)` and
// `Payout::<Eur>::send(9)` would share the default scope, and one would replay "paid 9 in EUR".
use idem_runtime::idempotent;
use std::marker::PhantomData;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Currency {
    const CODE: &'static str;
}

struct Payout<C>(PhantomData<C>);

impl<C: Currency> Payout<C> {
    #[idempotent(key = "id")]
    async fn send(id: u64) -> Result<String, AppError> {
        Ok(format!("paid {id} in {}", C::CODE))
    }
}

struct Usd;
impl Currency for Usd {
    const CODE: &'static str = "USD";
}

fn main() {
    let _ = Payout::<Usd>::send(9);
}
