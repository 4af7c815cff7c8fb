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

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Barrier, oneshot};
use tokio::time::Instant;

use crate::{
    Begin, BeginRequest, Call, Error, Fingerprint, Key, Lease, Options, Store, StoreError, Token,
    run,
};

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

/// begin on an absent key acquires a lease with a positive fence.
pub async fn absent_key_is_acquired(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("absent"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    assert!(lease.fence > 0);
}

/// begin on a live in-flight key answers InFlight with a retry-after within the ttl.
pub async fn live_lease_answers_in_flight(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("inflight"), key("order-1"));
    acquire(store, &req(&s, &k, Duration::from_secs(10))).await;
    match store.begin(&req(&s, &k, LONG)).await.unwrap() {
        Begin::InFlight { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(10))
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// A retried begin with the token that holds the key acquires again, with the same fence.
pub async fn begin_retry_is_idempotent(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("begin-retry"), key("order-1"));
    let r = req(&s, &k, LONG);
    let a = acquire(store, &r).await;
    let b = acquire(store, &r).await;
    assert_eq!(a, b);
}

/// An expired lease is taken over with a new token and a greater fence.
pub async fn expired_lease_is_taken_over(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("takeover"), key("order-1"));
    let old = acquire(store, &req(&s, &k, SHORT)).await;
    let new = acquire_eventually(store, &s, &k, LONG).await;
    assert_ne!(old.token, new.token);
    assert!(
        new.fence > old.fence,
        "fence {} !> {}",
        new.fence,
        old.fence
    );
}

/// After a takeover the stale holder can neither complete, extend nor release; the new holder's
/// record is untouched.
pub async fn stale_holder_is_fenced_off(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("stale"), key("order-1"));
    let old = acquire(store, &req(&s, &k, SHORT)).await;
    let new = acquire_eventually(store, &s, &k, LONG).await;
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"stale", LONG).await
    ));
    assert!(lease_lost(store.extend(&s, &k, &old, LONG).await));
    store.release(&s, &k, &old).await.unwrap();
    assert_in_flight(store, &s, &k).await;
    store.complete(&s, &k, &new, b"fresh", LONG).await.unwrap();
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"stale", LONG).await
    ));
    store.release(&s, &k, &old).await.unwrap();
    assert_eq!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed {
            output: b"fresh".to_vec()
        }
    );
}

/// A completed key replays exactly the stored bytes (all byte values, 64 KiB).
pub async fn completed_key_replays_exact_output(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("replay"), key("order-1"));
    let output: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 256) as u8).collect();
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, &output, LONG).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            store.begin(&req(&s, &k, LONG)).await.unwrap(),
            Begin::Completed {
                output: output.clone()
            }
        );
    }
}

/// A retried complete with the same token succeeds and does not change the record.
pub async fn complete_retry_is_idempotent(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("complete-retry"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"once", LONG).await.unwrap();
    store.complete(&s, &k, &lease, b"once", LONG).await.unwrap();
    assert_eq!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed {
            output: b"once".to_vec()
        }
    );
}

/// release frees the key at once (retries are harmless) and the next lease has a greater fence.
pub async fn release_frees_the_key(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("release"), key("order-1"));
    let first = acquire(store, &req(&s, &k, LONG)).await;
    store.release(&s, &k, &first).await.unwrap();
    store.release(&s, &k, &first).await.unwrap();
    let second = acquire(store, &req(&s, &k, LONG)).await;
    assert!(second.fence > first.fence);
    // The first holder's late release must not free the second holder's lease.
    store.release(&s, &k, &first).await.unwrap();
    assert_in_flight(store, &s, &k).await;
}

/// release does not delete a completed record.
pub async fn release_after_complete_keeps_the_record(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("release-done"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"kept", LONG).await.unwrap();
    store.release(&s, &k, &lease).await.unwrap();
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

/// extend keeps a short lease alive well past its ttl.
pub async fn extend_keeps_the_lease(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("extend"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, SHORT)).await;
    let until = Instant::now() + SHORT * 4;
    while Instant::now() < until {
        tokio::time::sleep(SHORT / 3).await;
        store.extend(&s, &k, &lease, SHORT).await.unwrap();
        assert_in_flight(store, &s, &k).await;
    }
    store.complete(&s, &k, &lease, b"ok", LONG).await.unwrap();
}

/// A done record answers Mismatch to another fingerprint, and replays to the same one or none.
pub async fn fingerprints_are_checked(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("fingerprint"), key("order-1"));
    let a = Fingerprint::of(&"payload-a").unwrap();
    let b = Fingerprint::of(&"payload-b").unwrap();
    let lease = acquire(
        store,
        &BeginRequest {
            fingerprint: Some(a),
            ..req(&s, &k, LONG)
        },
    )
    .await;
    store.complete(&s, &k, &lease, b"out", LONG).await.unwrap();
    let with = |fp| BeginRequest {
        fingerprint: fp,
        ..req(&s, &k, LONG)
    };
    assert_eq!(store.begin(&with(Some(b))).await.unwrap(), Begin::Mismatch);
    let replay = Begin::Completed {
        output: b"out".to_vec(),
    };
    assert_eq!(store.begin(&with(Some(a))).await.unwrap(), replay);
    assert_eq!(store.begin(&with(None)).await.unwrap(), replay);
}

/// A completion after the lease lapsed (nobody took over) keeps the lease's fingerprint: a later
/// call with another payload is refused, not replayed.
pub async fn lapsed_completion_keeps_the_fingerprint(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("lapsed-fingerprint"), key("order-1"));
    let a = Fingerprint::of(&"payload-a").unwrap();
    let lease = acquire(
        store,
        &BeginRequest {
            fingerprint: Some(a),
            ..req(&s, &k, SHORT)
        },
    )
    .await;
    // The lease lapses (the store's clock decides when; give it twice the ttl), unrenewed.
    tokio::time::sleep(SHORT * 2).await;
    store.complete(&s, &k, &lease, b"late", LONG).await.unwrap();
    let with = |fp| BeginRequest {
        fingerprint: fp,
        ..req(&s, &k, LONG)
    };
    let other = Fingerprint::of(&"payload-b").unwrap();
    assert_eq!(
        store.begin(&with(Some(other))).await.unwrap(),
        Begin::Mismatch
    );
    assert_eq!(
        store.begin(&with(Some(a))).await.unwrap(),
        Begin::Completed {
            output: b"late".to_vec()
        }
    );
}

/// Fences strictly increase across releases and takeovers of one key.
pub async fn fences_strictly_increase(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("fence"), key("order-1"));
    let mut last = 0;
    for round in 0..6 {
        let lease = if round % 2 == 0 {
            acquire(store, &req(&s, &k, LONG)).await
        } else {
            // Let this one expire and be taken over instead of released.
            let l = acquire(store, &req(&s, &k, SHORT)).await;
            assert!(l.fence > last);
            last = l.fence;
            acquire_eventually(store, &s, &k, LONG).await
        };
        assert!(lease.fence > last, "fence {} !> {last}", lease.fence);
        last = lease.fence;
        store.release(&s, &k, &lease).await.unwrap();
    }
}

/// A done record is forgotten after `keep`, and the key can run again.
pub async fn done_record_expires_after_keep(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("keep"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"out", SHORT).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match store.begin(&req(&s, &k, LONG)).await.unwrap() {
            Begin::Acquired(next) => {
                assert!(next.fence > lease.fence);
                return;
            }
            Begin::Completed { .. } => {
                assert!(Instant::now() < deadline, "done record never expired");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A done record lives for `keep`, not for the lease's ttl.
pub async fn done_record_outlives_the_lease_ttl(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("done-ttl"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, SHORT)).await;
    store.complete(&s, &k, &lease, b"out", LONG).await.unwrap();
    tokio::time::sleep(SHORT * 2).await;
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

/// The same key in two scopes is two records.
pub async fn scopes_are_separate(store: Arc<dyn Store>) {
    let store = &*store;
    let (s1, s2, k) = (scope("scope-a"), scope("scope-b"), key("order-1"));
    let l1 = acquire(store, &req(&s1, &k, LONG)).await;
    store.complete(&s1, &k, &l1, b"a", LONG).await.unwrap();
    acquire(store, &req(&s2, &k, LONG)).await;
}

/// Keys that differ only after the hashing threshold stay different records.
pub async fn long_keys_do_not_collide(store: Arc<dyn Store>) {
    let store = &*store;
    let s = scope("long-keys");
    let base = "k".repeat(crate::MAX_KEY_LEN * 2);
    let (k1, k2) = (key(&format!("{base}1")), key(&format!("{base}2")));
    let l1 = acquire(store, &req(&s, &k1, LONG)).await;
    store.complete(&s, &k1, &l1, b"1", LONG).await.unwrap();
    acquire(store, &req(&s, &k2, LONG)).await;
}

// ---- The wrapper on this store ----

fn opts(check: &str) -> Options {
    Options::with_scope(scope(check))
}

async fn counted<T>(count: &AtomicU32, value: T) -> Result<T, Error> {
    count.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// The wrapper runs once and replays the exact output to duplicates.
pub async fn wrapper_replays_output(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-replay");
    let runs = AtomicU32::new(0);
    let value = (
        String::from("coupon-\u{1F39F}"),
        vec![1u64, u64::MAX],
        Some(-3i8),
    );
    for _ in 0..3 {
        let out = run(store, &o, Call::new("order-9"), || {
            counted(&runs, value.clone())
        })
        .await;
        assert_eq!(out.unwrap(), value);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler error releases the key: the redelivery runs.
pub async fn wrapper_releases_on_err(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-err");
    let runs = AtomicU32::new(0);
    let failed: Result<u32, Error> = run(store, &o, Call::new(&1u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Err(Error::InvalidKey { reason: "handler" })
    })
    .await;
    assert!(failed.is_err());
    let ok = run(store, &o, Call::new(&1u8), || counted(&runs, 5u32)).await;
    assert_eq!(ok.unwrap(), 5);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A panicking handler releases the key before the panic resumes.
pub async fn wrapper_releases_on_panic(store: Arc<dyn Store>) {
    let owned = store.clone();
    let store = &*store;
    let o = Arc::new(opts("w-panic"));
    let runs = Arc::new(AtomicU32::new(0));
    let task = {
        let (o, runs, owned) = (o.clone(), runs.clone(), owned.clone());
        tokio::spawn(async move {
            let _: Result<(), Error> = run(&owned, &o, Call::new(&2u8), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                panic!("handler panicked");
            })
            .await;
        })
    };
    let joined = task.await;
    assert!(joined.unwrap_err().is_panic());
    let ok = run(store, &o, Call::new(&2u8), || counted(&runs, 6u32)).await;
    assert_eq!(ok.unwrap(), 6);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A cancelled call releases its key (long before the ttl), so a redelivery runs.
pub async fn wrapper_releases_after_cancellation(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-cancel").ttl(LONG);
    let (started_tx, started_rx) = oneshot::channel();
    let call = run(store, &o, Call::new(&3u8), || async move {
        let _ = started_tx.send(());
        std::future::pending::<Result<u32, Error>>().await
    });
    tokio::select! {
        _ = call => unreachable!("the handler never finishes"),
        _ = started_rx => {} // the handler holds the lease: cancel by dropping the call
    }
    // Release is asynchronous for network stores: wait for it, far less than the 60 s ttl.
    let deadline = Instant::now() + PATIENCE;
    let runs = AtomicU32::new(0);
    loop {
        match run(store, &o, Call::new(&3u8), || counted(&runs, 7u32)).await {
            Ok(v) => {
                assert_eq!(v, 7);
                break;
            }
            Err(Error::InFlight { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("key was not released after cancellation: {e}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// By default an in-flight duplicate is refused at once with a retry-after, and not run.
pub async fn wrapper_rejects_in_flight_duplicate(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-reject");
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = run(store, &o, Call::new(&4u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(40u32)
    });
    let second = async {
        started_rx.await.unwrap();
        let dup = run(store, &o, Call::new(&4u8), || counted(&runs, 41u32)).await;
        let _ = finish_tx.send(());
        dup
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 40);
    match second {
        Err(Error::InFlight { retry_after, .. }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// With `wait`, an in-flight duplicate waits for the holder and replays its output.
pub async fn wrapper_waits_for_in_flight_duplicate(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-wait").wait(PATIENCE);
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = run(store, &o, Call::new(&5u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(50u32)
    });
    let second = async {
        started_rx.await.unwrap();
        let dup = run(store, &o, Call::new(&5u8), || counted(&runs, 51u32));
        let mut dup = std::pin::pin!(dup);
        // The duplicate is waiting (not answered) while the holder runs...
        tokio::select! {
            biased;
            r = &mut dup => panic!("duplicate answered while the holder runs: {r:?}"),
            _ = tokio::task::yield_now() => {}
        }
        let _ = finish_tx.send(());
        dup.await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 50);
    assert_eq!(second.unwrap(), 50);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Many tasks race on one key: the effect happens exactly once and every caller gets its output.
pub async fn wrapper_race_runs_once(store: Arc<dyn Store>) {
    const TASKS: usize = 64;
    let o = Arc::new(opts("w-race").wait(PATIENCE));
    let runs = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (o, runs, barrier, store) = (o.clone(), runs.clone(), barrier.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            run(&store, &o, Call::new("the-one-key"), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Long enough that the others arrive while it is in flight.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Error>(i)
            })
            .await
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap().unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "effect ran more than once");
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "{outputs:?}");
}

/// A handler slower than its ttl keeps its lease (the watchdog renews it): a duplicate arriving
/// after several ttls is refused, not run.
pub async fn wrapper_renews_slow_handler(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-slow").ttl(SHORT);
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let slow = run(store, &o, Call::new(&6u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(60u32)
    });
    let duplicate = async {
        started_rx.await.unwrap();
        // Three ttls: without renewal the lease would have expired twice over.
        tokio::time::sleep(SHORT * 3).await;
        let dup = run(store, &o, Call::new(&6u8), || counted(&runs, 61u32)).await;
        let _ = finish_tx.send(());
        dup
    };
    let (slow, dup) = tokio::join!(slow, duplicate);
    assert_eq!(slow.unwrap(), 60);
    assert!(matches!(dup, Err(Error::InFlight { .. })), "{dup:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A record that does not decode is a typed error, and the handler does not run.
pub async fn wrapper_reports_corrupt_record(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-corrupt");
    let k = key("7");
    let lease = acquire(store, &req(o.scope_str(), &k, LONG)).await;
    store
        .complete(o.scope_str(), &k, &lease, b"\x42garbage", LONG)
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let out = run(store, &o, Call::new(&7u8), || counted(&runs, 1u32)).await;
    assert!(matches!(out, Err(Error::Corrupt { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The same key with another payload is refused with Mismatch, never run nor replayed.
pub async fn wrapper_refuses_fingerprint_mismatch(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-mismatch");
    let runs = AtomicU32::new(0);
    let call = |amount: u32| Call::new(&8u8).fingerprint(Fingerprint::of(&amount));
    assert_eq!(
        run(store, &o, call(100), || counted(&runs, 1u32))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        run(store, &o, call(100), || counted(&runs, 2u32))
            .await
            .unwrap(),
        1
    );
    let other = run(store, &o, call(999), || counted(&runs, 3u32)).await;
    assert!(matches!(other, Err(Error::Mismatch { .. })), "{other:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// An empty key is a typed error and nothing runs.
pub async fn wrapper_refuses_empty_key(store: Arc<dyn Store>) {
    let store = &*store;
    let runs = AtomicU32::new(0);
    let out = run(store, &opts("w-empty"), Call::new(""), || {
        counted(&runs, 1u32)
    })
    .await;
    assert!(matches!(out, Err(Error::InvalidKey { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

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
