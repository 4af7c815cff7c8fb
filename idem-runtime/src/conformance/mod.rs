//! The conformance suite: the contract of `protocol.md`, runnable against any [`Store`].
//!
//! Every row of the state table, expiry and takeover, stale holders, fence order, exact replay,
//! fingerprints, release on `Err`, panic and cancellation, and races with executions counted. Run
//! all of it against your store with [`store_conformance!`](crate::store_conformance):
//!
//! ```
//! // In tests/my_store.rs (needs tokio with the `macros` and `rt-multi-thread` features):
//! idem_runtime::store_conformance!(async { idem_runtime::MemoryStore::new() });
//! # fn main() {}
//! ```
//!
//! Each check uses a scope of its own, so a shared server (one Redis, one database) can run them
//! all at once. Checks that need time to pass (expiry) use leases of a few hundred milliseconds and
//! wait for the store's answer to change, bounded by a deadline, never for a fixed time.

mod ops;
mod store;
mod wrapper;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Begin, BeginRequest, Key, Lease, Store, StoreError, Token};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);
/// How long a check waits for something the store must do within a short ttl.
const PATIENCE: Duration = Duration::from_secs(10);

fn scope(check: &str) -> String {
    format!("idem-conformance:{check}:{}", Token::generate().to_hex())
}

fn key(text: &str) -> Key {
    Key::new(text).expect("valid key")
}

fn req<'a>(scope: &'a str, key: &'a Key, ttl: Duration) -> BeginRequest<'a> {
    BeginRequest {
        scope,
        key,
        token: Token::generate(),
        ttl,
        fingerprint: None,
    }
}

async fn acquire(store: &dyn Store, r: &BeginRequest<'_>) -> Lease {
    match store.begin(r).await.expect("begin") {
        Begin::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Call `begin` with a fresh token until it acquires (the previous lease expired), bounded.
async fn acquire_eventually(store: &dyn Store, scope: &str, key: &Key, ttl: Duration) -> Lease {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match store.begin(&req(scope, key, ttl)).await.expect("begin") {
            Begin::Acquired(lease) => return lease,
            Begin::InFlight { retry_after } => {
                assert!(Instant::now() < deadline, "lease never expired");
                tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
            }
            other => panic!("expected InFlight then Acquired, got {other:?}"),
        }
    }
}

async fn assert_in_flight(store: &dyn Store, scope: &str, key: &Key) {
    match store.begin(&req(scope, key, LONG)).await.expect("begin") {
        Begin::InFlight { .. } => {}
        other => panic!("expected InFlight, got {other:?}"),
    }
}

fn lease_lost(r: Result<(), StoreError>) -> bool {
    matches!(r, Err(StoreError::LeaseLost))
}

pub use ops::*;
pub use store::*;
pub use wrapper::*;

/// What the factory given to [`store_conformance!`](crate::store_conformance) yields: a store, or
/// an `Option` of one, where `None` skips the check (the server the store needs is not reachable,
/// and the factory has said so loudly, or failed under CI).
pub trait ConformanceStore {
    /// The store to check, or `None` to skip.
    fn into_store(self) -> Option<Arc<dyn Store>>;
}

impl<S: Store> ConformanceStore for S {
    fn into_store(self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(self))
    }
}

impl<S: Store> ConformanceStore for Option<S> {
    fn into_store(self) -> Option<Arc<dyn Store>> {
        self.map(|s| Arc::new(s) as Arc<dyn Store>)
    }
}

/// Runs every check of this module against a store, one `#[tokio::test]` each.
///
/// The argument is an expression that evaluates to a future of the store, or of an
/// `Option<store>` whose `None` skips the check (see [`ConformanceStore`]); it is evaluated once
/// per check. The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
///
/// ```
/// // tests/conformance_memory.rs
/// idem_runtime::store_conformance!(async { idem_runtime::MemoryStore::new() });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@checks $make; absent_key_is_acquired,
            live_lease_answers_in_flight,
            begin_retry_is_idempotent,
            expired_lease_is_taken_over,
            stale_holder_is_fenced_off,
            completed_key_replays_exact_output,
            complete_retry_is_idempotent,
            release_frees_the_key,
            release_after_complete_keeps_the_record,
            extend_keeps_the_lease,
            fingerprints_are_checked,
            lapsed_completion_keeps_the_fingerprint,
            fences_strictly_increase,
            done_record_expires_after_keep,
            done_record_outlives_the_lease_ttl,
            scopes_are_separate,
            long_keys_do_not_collide,
            wrapper_replays_output,
            wrapper_releases_on_err,
            wrapper_releases_on_panic,
            wrapper_releases_after_cancellation,
            wrapper_rejects_in_flight_duplicate,
            wrapper_waits_for_in_flight_duplicate,
            wrapper_race_runs_once,
            wrapper_renews_slow_handler,
            wrapper_reports_corrupt_record,
            wrapper_refuses_fingerprint_mismatch,
            wrapper_refuses_empty_key);
    };
    (@checks $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let ::std::option::Option::Some(store) =
                    $crate::conformance::ConformanceStore::into_store($make.await)
                else {
                    return;
                };
                $crate::conformance::$check(store).await;
            }
        )*
    };
}

/// What the factory given to [`operations_conformance!`](crate::operations_conformance) yields:
/// a store with the operations, or an `Option` of one (`None` skips the check).
pub trait ConformanceOperable {
    /// The store to check, or `None` to skip.
    fn into_operable(self) -> Option<Arc<dyn OperableStore>>;
}

impl<S: Store + crate::Operations> ConformanceOperable for S {
    fn into_operable(self) -> Option<Arc<dyn OperableStore>> {
        Some(Arc::new(self))
    }
}

impl<S: Store + crate::Operations> ConformanceOperable for Option<S> {
    fn into_operable(self) -> Option<Arc<dyn OperableStore>> {
        self.map(|s| Arc::new(s) as Arc<dyn OperableStore>)
    }
}

/// Runs the checks of the operations ([`Operations`](crate::Operations): inspect, list, counts,
/// forget, release_stuck) against a store, one `#[tokio::test]` each; the argument as for
/// [`store_conformance!`](crate::store_conformance).
///
/// ```
/// idem_runtime::operations_conformance!(async { idem_runtime::MemoryStore::new() });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! operations_conformance {
    ($make:expr) => {
        $crate::operations_conformance!(@checks $make;
            ops_inspect_tells_each_state,
            ops_forget_lets_a_done_key_run_again,
            ops_forced_forget_refuses_the_old_holders_mark,
            ops_release_stuck_frees_only_leases,
            ops_list_pages_and_counts,
            ops_forced_forget_while_the_handler_runs);
    };
    (@checks $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let ::std::option::Option::Some(store) =
                    $crate::conformance::ConformanceOperable::into_operable($make.await)
                else {
                    return;
                };
                $crate::conformance::$check(store).await;
            }
        )*
    };
}
