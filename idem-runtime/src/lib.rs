//! # idem: make a handler's effect happen once
//!
//! Message queues deliver at least once, HTTP clients retry, people double-click. `idem` wraps an
//! async handler in **lock, check, execute, mark**: claim the business key, replay the stored
//! output if the key is already done, otherwise run the handler (renewing the lease while it runs)
//! and mark the key done with its output. On error, panic or cancellation the key is released so a
//! redelivery can run.
//!
//! ```
//! use idem_runtime::{idempotent, MemoryStore};
//!
//! #[derive(Debug, thiserror::Error)]
//! enum AppError {
//!     #[error(transparent)]
//!     Idem(#[from] idem_runtime::Error),
//! }
//!
//! #[idempotent(key = "order_id", ttl = "10m")]
//! async fn issue_coupon(order_id: u64, user: &str) -> Result<String, AppError> {
//!     Ok(format!("coupon-{order_id}-{user}"))
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! idem_runtime::install_default_store(MemoryStore::new()).unwrap();
//! let first = issue_coupon(42, "ann").await.unwrap();
//! let duplicate = issue_coupon(42, "ann").await.unwrap(); // replayed, not run again
//! assert_eq!(first, duplicate);
//! # });
//! ```
//!
//! The pieces: the [`Store`] trait (the contract every backend honours), the [`MemoryStore`],
//! the [`Error`] a caller matches on, and [`run`], the same wrapper without the macro.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod error;
mod key;
mod lease;
mod metrics;
mod options;
mod run;
mod store;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub use store::sql;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

/// The `redis` crate the Redis store is built on (1.x), for building your own client or connection.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ::redis;
/// The `sqlx` crate (0.9) the SQL store is built on, for building pools and transactions.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub use ::sqlx;
pub use error::{BoxError, Error, Phase, StoreError};
pub use key::{
    Fingerprint, FingerprintBuilder, Key, KeyBuilder, KeyPart, MAX_KEY_LEN, reveal_keys,
};
pub use lease::{CurrentLease, current_lease};
pub use options::Options;
pub use run::{AbsorbsIdemError, Call, Outcome, Replayable, TxConnection, run};
#[cfg(feature = "mysql")]
pub use sql::MySqlStore;
#[cfg(feature = "postgres")]
pub use sql::PgStore;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub use sql::SqlStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteStore;
pub use store::layered::{LayeredStore, LayeredStoreBuilder};
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisConnection, RedisStore, RedisStoreBuilder};
pub use store::{
    AlreadyInstalled, Begin, BeginRequest, DefaultStore, Lease, Store, StoreHandle, Token, TxStore,
    default_store, install_default_store,
};

/// Wrap an async fn in lock-check-execute-mark, keeping its signature.
///
/// The function must be `async` and return `Result<T, E>`, where `T` (the output, stored and
/// replayed to duplicates) implements serde's `Serialize` and `Deserialize`, and `E` implements
/// `From<idem_runtime::Error>`.
///
/// | option | meaning | default |
/// |---|---|---|
/// | `key = "..."` | a parameter (`"order_id"`), a field path (`"msg.order_id"`), or a template (`"{tenant}:{order.id}"`) | required |
/// | `ttl = "10m"` | the in-flight lease, renewed while the handler runs | `"60s"` |
/// | `keep = "24h"` | how long the done record and its output are kept | `"24h"` |
/// | `wait = "5s"` | an in-flight duplicate waits up to this long and replays the holder's output | refuse at once with [`Error::InFlight`] |
/// | `scope = "..."` | the key namespace | module path and fn name |
/// | `store = "self.idem"` | an expression giving the store | the [`DefaultStore`] |
/// | `fingerprint = "amount, currency"` | parameters whose hash must match on replay ([`Error::Mismatch`]) | none |
/// | `crate = "idem"` | the path of this crate when renamed | `::idem_runtime` |
///
/// ```
/// use idem_runtime::{idempotent, Error, MemoryStore};
///
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Receipt { order: u64, cents: u32 }
///
/// struct Billing { idem: MemoryStore }
///
/// impl Billing {
///     #[idempotent(key = "{tenant}:{order}", store = "self.idem", ttl = "30s", fingerprint = "cents")]
///     async fn charge(&self, tenant: &str, order: u64, cents: u32) -> Result<Receipt, Error> {
///         Ok(Receipt { order, cents })
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let billing = Billing { idem: MemoryStore::new() };
/// let first = billing.charge("acme", 7, 500).await.unwrap();
/// assert_eq!(billing.charge("acme", 7, 500).await.unwrap(), first); // replayed
/// assert!(matches!(billing.charge("acme", 7, 999).await, Err(Error::Mismatch { .. })));
/// # });
/// ```
#[doc(inline)]
pub use idem_macros::idempotent;

/// Support for the code `#[idempotent]` generates. Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::run::{run_future, run_tx_future, tx_access};
    pub use serde;

    /// Pins the body's output type to the function's return type, so `?` and `.into()` in the body
    /// infer as they did before the attribute was added.
    #[inline(always)]
    pub fn typed<R, F: ::core::future::Future<Output = R>>(f: F) -> F {
        f
    }

    /// Marks a key part expression, so a type that is not a key is reported on the key literal.
    #[inline(always)]
    pub fn key_part<K: crate::KeyPart + ?Sized>(k: &K) -> &K {
        k
    }
}
