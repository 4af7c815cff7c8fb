//! Review rev1: the new key forms (an `Option` key, an `OptionalKey` part in a template, a
//! foreign `Display` key, generic keys) compile under the strict lint set of strict_lints.rs
//! plus `#![deny(warnings)]`.
#![deny(
    warnings,
    unused_results,
    unused_qualifications,
    unused_import_braces,
    trivial_casts,
    unused_extern_crates,
    unreachable_patterns,
    missing_docs,
    clippy::all
)]
#![forbid(unsafe_code)]

use idem_runtime::sqlx::{Sqlite, Transaction};
use idem_runtime::{KeyPart, MemoryStore, OptionalKey, SqliteStore, idempotent};

/// The handlers' error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// idem's own.
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// Another crate's id.
pub struct ForeignId(pub u128);

impl std::fmt::Display for ForeignId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// An optional header.
pub struct RequestId(pub String);

impl KeyPart for RequestId {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out)
    }
}

impl OptionalKey for RequestId {}

/// An `Option` key.
#[idempotent(key = "key")]
pub async fn optional(key: Option<RequestId>) -> Result<u32, AppError> {
    let _ = key;
    Ok(1)
}

/// A foreign key in a template with an optional part.
#[idempotent(key = "{user}/{request}", store = "store", fingerprint = "user.0")]
pub async fn template(
    store: &MemoryStore,
    user: ForeignId,
    request: Option<RequestId>,
) -> Result<u32, AppError> {
    let _ = (user, request);
    Ok(1)
}

/// Generic keys.
#[idempotent(key = "{a}:{b}", scope = "tests.generic")]
pub async fn generic<A: KeyPart + Sync, B: std::fmt::Display + Sync>(a: A, b: B) -> Result<u32, AppError> {
    let _ = (&a, &b);
    Ok(1)
}

/// The transactional form with an `Option` key.
#[idempotent(key = "key", tx = "tx", store = "store")]
pub async fn transactional(
    store: &SqliteStore,
    tx: &mut Transaction<'_, Sqlite>,
    key: Option<RequestId>,
) -> Result<i64, AppError> {
    let _ = (store, key);
    Ok(1)
}

/// A service.
pub struct Service {
    idem: MemoryStore,
    request: Option<RequestId>,
}

impl Service {
    /// A method keyed on an optional field of `self` in a template.
    #[idempotent(key = "{id}/{self.request}", store = "self.idem", scope = "tests.method")]
    pub async fn method(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

fn main() {
    let _ = Service {
        idem: MemoryStore::new(),
        request: None,
    };
    let _ = optional(None);
    let _ = template;
    let _ = generic(1u64, ForeignId(1));
    let _ = transactional;
}
