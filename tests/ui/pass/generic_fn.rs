use idem_runtime::{KeyPart, idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

// Generic handlers name their scope: the instantiations share it knowingly.
#[idempotent(key = "id", scope = "tests.generic_key")]
async fn generic_key<K: KeyPart + Send + Sync>(id: K) -> Result<(), AppError> {
    let _ = id;
    Ok(())
}

#[idempotent(key = "id", scope = "tests.generic_output")]
async fn generic_output<T, E>(id: u64, value: T) -> Result<T, E>
where
    T: Serialize + DeserializeOwned + Send,
    E: From<idem_runtime::Error>,
{
    let _ = id;
    Ok(value)
}

#[idempotent(key = "id", fingerprint = "id", scope = "tests.const_generic")]
async fn const_generic<const N: usize>(id: u64, payload: [u8; N]) -> Result<usize, AppError> {
    let _ = id;
    Ok(payload.len())
}

fn main() {
    let _ = generic_key(1u64);
    let _ = generic_key("abc");
    let _ = generic_output::<String, AppError>(1, "x".into());
    let _ = const_generic(1, [0u8; 4]);
}
