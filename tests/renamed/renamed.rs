//! A renamed dependency (`idem = { package = "idem-runtime", ... }`) used to fail with "cannot
//! find `idem_runtime`" three times and no hint: the attribute now reads the rename from this
//! crate's Cargo.toml.

use idem::{Error, MemoryStore, idempotent};

#[idempotent(key = "order_id", store = "store")]
async fn issue(store: &MemoryStore, order_id: u64) -> Result<u64, Error> {
    Ok(order_id * 10)
}

#[tokio::test]
async fn a_renamed_dependency_needs_no_crate_option() {
    let store = MemoryStore::new();
    assert_eq!(issue(&store, 4).await.unwrap(), 40);
    assert_eq!(issue(&store, 4).await.unwrap(), 40);
}
