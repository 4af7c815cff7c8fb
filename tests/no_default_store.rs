//! Without an installed default store, a call is a typed error, not a panic, and nothing runs.
//! (Its own test binary: the default store is process-wide.)

use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::{Error, idempotent};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "id")]
async fn handler(id: u64) -> Result<u64, Error> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(id)
}

#[tokio::test]
async fn no_store_installed_is_a_typed_error() {
    let out = handler(1).await;
    assert!(matches!(out, Err(Error::NoStore)), "{out:?}");
    assert_eq!(RUNS.load(Ordering::SeqCst), 0);
    assert!(
        out.unwrap_err()
            .to_string()
            .contains("install_default_store")
    );
}
