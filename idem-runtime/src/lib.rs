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
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod error;
mod key;
mod memory;
mod metrics;
mod options;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis_store;
mod run;
mod store;

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
pub mod sql;

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
pub use key::{Fingerprint, FingerprintBuilder, Key, KeyBuilder, KeyPart, MAX_KEY_LEN};
pub use memory::MemoryStore;
pub use options::Options;
#[cfg(feature = "redis")]
pub use redis_store::{RedisConnection, RedisStore, RedisStoreBuilder};
pub use run::{AbsorbsIdemError, Call, Outcome, Replayable, run};
#[cfg(feature = "mysql")]
pub use sql::MySqlStore;
#[cfg(feature = "postgres")]
pub use sql::PgStore;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub use sql::SqlStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteStore;
pub use store::{
    AlreadyInstalled, Begin, BeginRequest, DefaultStore, Lease, Store, StoreHandle, Token,
    default_store, install_default_store,
};

/// Wrap an async fn in lock-check-execute-mark. See the crate docs and the README for options.
#[doc(inline)]
pub use idem_macros::idempotent;

/// Support for the code `#[idempotent]` generates. Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::run::run_future;
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
