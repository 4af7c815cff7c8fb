// Instantiations of a generic handler would share its default scope: `average::<Celsius>` could
// replay `average::<Fahrenheit>`'s output. The macro asks for the scope instead of guessing.
use idem_runtime::idempotent;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

trait Unit {
    fn convert(raw: f64) -> f64;
}

#[idempotent(key = "reading_id")]
async fn average<U: Unit>(reading_id: u64, raw: f64) -> Result<f64, AppError> {
    let _ = reading_id;
    Ok(U::convert(raw))
}

fn main() {}
