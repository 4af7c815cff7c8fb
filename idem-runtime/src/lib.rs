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
//! For a handler whose effect is a write to a database, the transactional form
//! (`#[idempotent(key = "order_id", tx = "tx")]` on a fn that takes `&mut Transaction`) writes the
//! done mark in the handler's own transaction, so the effect and the mark commit together: see
//! [`idempotent`].
//!
//! The pieces: the [`Store`] trait (the contract every backend honours), the [`MemoryStore`],
//! the [`Error`] a caller matches on, [`current_lease`] (the lease inside a handler), and [`run`],
//! the same wrapper without the macro.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod ack;
mod codec;
mod error;
mod key;
mod lease;
mod macro_support;
mod metrics;
mod observe;
mod options;
mod pg_tx;
mod run;
mod shadow;
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
    DisplayKey, Fingerprint, FingerprintBuilder, Key, KeyBuilder, KeyPart, MAX_KEY_LEN,
    OptionalKey, REDACTION_KEY_ENV, RedactionKeyInUse, reveal_keys, set_redaction_key,
};
pub use lease::{CurrentLease, current_lease, wait_for_background};
pub use observe::{CallOutcome, Report, Would, observe};
pub use options::Options;
pub use pg_tx::{Param, PgError, PgFuture, PgTransaction, Row, Value};
pub use run::{AbsorbsIdemError, Call, Outcome, Replayable, TxConnection, TxRef, run};
pub use shadow::{SHADOW_ENV, set_shadow, shadow};
#[cfg(feature = "mysql")]
pub use sql::MySqlStore;
#[cfg(feature = "postgres")]
pub use sql::PgStore;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub use sql::SqlStore;
#[cfg(feature = "sqlite")]
pub use sql::SqliteStore;
pub use store::cached::{CachedStore, CachedStoreBuilder};
pub use store::layered::{LayeredStore, LayeredStoreBuilder};
pub use store::memory::MemoryStore;
pub use store::ops::{Changed, Counts, KeyState, ListQuery, Listed, Operations, Page, StateFilter};
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
/// | `ttl = "10m"` | the in-flight lease, renewed while the handler runs (by idem's own thread) | `"60s"` |
/// | `keep = "24h"` | how long the done record and its output are kept | `"24h"` |
/// | `wait = "5s"` | an in-flight duplicate waits up to this long and replays the holder's output | refuse at once with [`Error::InFlight`] |
/// | `tx = "tx"` | the parameter that is the transaction: the transactional form (below) | none |
/// | `scope = "..."` | the key namespace. Renaming or moving the fn changes the default and orphans the records stored under it: pin it before a rename. Required on fns in `impl` blocks and traits and on generic fns (the default names neither the type nor the instantiation) | module path and fn name |
/// | `store = "self.idem"` | an expression giving the store: any [`Store`], a reference or an `Arc` to one, `&dyn Store` | the [`DefaultStore`] |
/// | `fingerprint = "amount, currency"` | parameters (or field paths) whose hash must match on replay ([`Error::Mismatch`]) | none |
/// | `max_lease = "1h"` | the longest the lease is renewed for one run (`"forever"`: while it runs); see [`Options::max_lease`] | `"1h"` |
/// | `max_output = "1MiB"` | the largest output stored for replay; larger ones mark the key done without it ([`Error::Unreplayable`]) | `"1MiB"` |
/// | `crate = "idem"` | the path of this crate when renamed | `::idem_runtime` |
///
/// Inside the body, [`current_lease`] gives the lease (its fence, and whether it was lost).
///
/// # The transactional form
///
/// With `tx = "name"`, the parameter `name` is the handler's transaction (`&mut
/// sqlx::Transaction<'_, DB>`, or `&mut` a connection inside one), and the store a `SqlStore` (or
/// a `LayeredStore` over one) on the same database. The key is claimed for that transaction, the
/// body runs, and the done mark is written **in the transaction**; the caller commits. So the
/// handler's writes and the mark commit together or not at all: exactly once in effect, across
/// crashes. If the caller rolls back, the key is free again (at once on PostgreSQL and SQLite, after
/// the lease on MySQL/MariaDB). idem takes a savepoint before the handler runs; if the handler
/// returns `Err` or the mark cannot be written, it rolls back to it before returning the error, so
/// the handler's writes can never commit without the mark, and the caller's own writes stay. See
/// the README's section on the transactional form for how each database holds the claim.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use idem_runtime::idempotent;
/// use idem_runtime::sqlx::{self, Sqlite, Transaction};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error(transparent)]
///     Idem(#[from] idem_runtime::Error),
///     #[error(transparent)]
///     Db(#[from] sqlx::Error),
/// }
///
/// #[idempotent(key = "order_id", tx = "tx", scope = "doc.issue_coupon")]
/// async fn issue_coupon(tx: &mut Transaction<'_, Sqlite>, order_id: i64) -> Result<i64, AppError> {
///     sqlx::query("INSERT INTO coupons (order_id) VALUES (?)")
///         .bind(order_id)
///         .execute(&mut **tx)
///         .await?;
///     Ok(order_id)
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let path = std::env::temp_dir().join(format!("idem-doc-tx-{}.db", std::process::id()));
/// let store = idem_runtime::SqliteStore::open(&path).await.unwrap();
/// let pool = store.pool().clone();
/// sqlx::query("CREATE TABLE coupons (order_id INTEGER)").execute(&pool).await.unwrap();
/// idem_runtime::install_default_store(store).unwrap();
/// for _delivery in 0..3 {
///     let mut tx = pool.begin().await.unwrap();
///     assert_eq!(issue_coupon(&mut tx, 7).await.unwrap(), 7); // replayed after the first
///     tx.commit().await.unwrap(); // the caller commits: the coupon and the mark, together
/// }
/// let coupons: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons").fetch_one(&pool).await.unwrap();
/// assert_eq!(coupons, 1);
/// # drop(pool);
/// # let _ = std::fs::remove_file(&path);
/// # });
/// # }
/// ```
///
/// # The plain form
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
///     #[idempotent(key = "{tenant}:{order}", store = "self.idem", ttl = "30s", fingerprint = "cents", scope = "billing.charge")]
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

// Every Rust block of the README compiles (`cargo test --workspace --all-features`).
#[cfg(all(doctest, feature = "sqlite", feature = "postgres"))]
#[doc = include_str!("../../README.md")]
mod readme {}

// And the adoption guide's.
#[cfg(all(doctest, feature = "sqlite", feature = "postgres"))]
#[doc = include_str!("../../docs/adopting.md")]
mod adopting {}

/// Support for the code `#[idempotent]` generates. Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::macro_support::{IdemStore, StoreDeref, StoreRef, key_tiers, store_ref};
    pub use crate::run::{run_future, run_tx_future, tx_access};
    pub use serde;

    /// Named by the error it gives: see its definition in `macro_support.rs`.
    pub use crate::__idem_fns_in_impls_and_traits_need_an_explicit_scope as fns_in_impls_and_traits_need_an_explicit_scope;

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
