//! The wrapper's guarantees on the paths where a handler used to run twice or a message could
//! never complete, each test named after what broke. The store is the real memory store; where a
//! test needs a store operation to stall (a mark in flight when the caller gives up), a thin
//! wrapper around it holds that one operation until the test lets it go.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{
    Begin, BeginRequest, Call, Error, Fingerprint, Key, Lease, MemoryStore, Options, Store,
    StoreError, current_lease, idempotent, run, wait_for_background,
};
use tokio::sync::{Notify, oneshot};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
}

fn counted(runs: &AtomicU32) -> u32 {
    runs.fetch_add(1, Ordering::SeqCst) + 1
}

/// The memory store, whose `complete` waits at a gate the test opens, and says when it was
/// entered.
#[derive(Clone, Default)]
struct GatedComplete(Arc<Gates>);

struct Gates {
    store: MemoryStore,
    entered: Notify,
    /// Closed until the test adds permits.
    gate: tokio::sync::Semaphore,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            store: MemoryStore::new(),
            entered: Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Store for GatedComplete {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.0.store.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.0.entered.notify_one();
        let _pass = self.0.gate.acquire().await.expect("open");
        self.0.store.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.0.store.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.store.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

/// A call dropped after the handler returned `Ok` (a timeout, a client hanging up) while its
/// done mark is being written: the mark is still written, in the background, so the redelivery
/// replays instead of running the handler again once the lease expires.
#[tokio::test]
async fn cancelled_during_the_mark_the_mark_is_still_written() {
    let store = GatedComplete::default();
    let opts = Options::new("guarantees::cancel_mark").ttl(Duration::from_secs(60));
    let runs = AtomicU32::new(0);
    {
        let call = run(&store, &opts, Call::new("order-1"), || async {
            Ok::<_, Error>(counted(&runs))
        });
        let mut call = std::pin::pin!(call);
        tokio::select! {
            out = &mut call => panic!("the mark was held at the gate, yet the call ended: {out:?}"),
            () = store.0.entered.notified() => {}
        }
        // Dropped here, with `complete` in flight.
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        !wait_for_background(Duration::from_millis(50)).await,
        "the mark waiting at the gate was not counted as background work"
    );
    store.0.gate.add_permits(100);
    // What a process does before it exits: the mark in flight is written first.
    assert!(
        wait_for_background(Duration::from_secs(10)).await,
        "the done mark was never written in the background"
    );
    let again: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
        Ok(counted(&runs))
    })
    .await;
    assert_eq!(again.unwrap(), 1, "replayed the first run's output");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

/// A handler outlives `max_lease` (it is wedged): the watchdog stops renewing, the handler is
/// told (`current_lease().lost()`), a duplicate takes the key over with a greater fence, and the
/// late handler's completion is refused; the new holder's record stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_handler_loses_its_lease_after_max_lease() {
    let store = MemoryStore::new();
    let opts = Options::new("guarantees::wedged")
        .ttl(Duration::from_millis(200))
        .max_lease(Duration::from_millis(400));
    let (started_tx, started_rx) = oneshot::channel();
    let (lost_tx, lost_rx) = oneshot::channel();
    let (unwedge_tx, unwedge_rx) = oneshot::channel::<()>();
    let wedged = {
        let (store, opts) = (store.clone(), opts.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("order-2"), || async move {
                let lease = current_lease().expect("inside a handler");
                let _ = started_tx.send(lease.fence());
                lease.lost().await;
                assert!(lease.is_lost());
                let _ = lost_tx.send(());
                let _ = unwedge_rx.await;
                Ok::<_, Error>("wedged".to_owned())
            })
            .await
        })
    };
    let wedged_fence = started_rx.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), lost_rx)
        .await
        .expect("the handler was never told its lease was lost")
        .unwrap();
    // The lease lapses a ttl after the last renewal: a duplicate takes it over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (fence, out) = loop {
        let out: Result<(u64, String), Error> =
            run(&store, &opts, Call::new("order-2"), || async {
                Ok((current_lease().unwrap().fence(), "taken over".to_owned()))
            })
            .await;
        match out {
            Ok(v) => break v,
            Err(Error::InFlight { retry_after, .. }) => {
                assert!(tokio::time::Instant::now() < deadline, "never taken over");
                tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(out, "taken over");
    assert!(fence > wedged_fence, "{fence} !> {wedged_fence}");
    unwedge_tx.send(()).unwrap();
    let late = wedged.await.unwrap();
    assert!(matches!(late, Err(Error::LeaseLost { .. })), "{late:?}");
    let replay: Result<(u64, String), Error> = run(&store, &opts, Call::new("order-2"), || async {
        Ok((0, "ran".to_owned()))
    })
    .await;
    assert_eq!(replay.unwrap(), (fence, "taken over".to_owned()));
}

/// `run` with a zero ttl gave no exclusion at all; `Options` raises it to the 100 ms minimum, so
/// a duplicate of a running call is still refused.
#[tokio::test]
async fn a_zero_ttl_still_excludes_duplicates() {
    let store = MemoryStore::new();
    let opts = Options::new("guarantees::zero_ttl").ttl(Duration::ZERO);
    assert_eq!(opts.ttl_duration(), Options::MIN_TTL);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = run(&store, &opts, Call::new("k"), || async {
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(1)
    });
    let second = async {
        started_rx.await.unwrap();
        // Past the clamped ttl: still held, because the watchdog renews it.
        tokio::time::sleep(Options::MIN_TTL * 3).await;
        let dup: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async { Ok(2) }).await;
        finish_tx.send(()).unwrap();
        dup
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 1);
    assert!(matches!(second, Err(Error::InFlight { .. })), "{second:?}");
}

/// An output larger than `max_output` still marks the key done: the handler is never run again,
/// and duplicates are told there is nothing to replay.
#[tokio::test]
async fn an_output_over_max_output_is_done_but_not_replayed() {
    let store = MemoryStore::new();
    let opts = Options::new("guarantees::big").max_output(1024);
    let runs = AtomicU32::new(0);
    for delivery in 0..3 {
        let out: Result<Vec<u8>, Error> = run(&store, &opts, Call::new("report-1"), || async {
            counted(&runs);
            Ok(vec![7u8; 4096])
        })
        .await;
        match (delivery, out) {
            (0, Ok(v)) => assert_eq!(v.len(), 4096),
            (_, Err(Error::Unreplayable { reason, .. })) => {
                assert!(reason.contains("max_output"), "{reason}")
            }
            (n, other) => panic!("delivery {n}: {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A payload that cannot be serialized was hashed by its error text, so every such payload
/// matched every other: now the call is refused before the handler runs.
#[tokio::test]
async fn an_unserializable_fingerprint_is_refused() {
    struct Opaque;
    impl serde::Serialize for Opaque {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("cannot be serialized"))
        }
    }
    let store = MemoryStore::new();
    let runs = AtomicU32::new(0);
    let out: Result<u32, Error> = run(
        &store,
        &Options::new("guarantees::fp"),
        Call::new("k").fingerprint(Fingerprint::of(&Opaque)),
        || async { Ok(counted(&runs)) },
    )
    .await;
    assert!(
        matches!(&out, Err(Error::InvalidFingerprint { reason }) if reason.contains("cannot be serialized")),
        "{out:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Reordering a struct's fields does not change its fingerprint (a deploy that does so must not
/// turn retries into mismatches); changing a value does.
#[test]
fn fingerprints_ignore_field_order() {
    #[derive(serde::Serialize)]
    struct V1 {
        amount: u32,
        currency: &'static str,
    }
    #[derive(serde::Serialize)]
    struct V2 {
        currency: &'static str,
        amount: u32,
    }
    let a = Fingerprint::of(&V1 {
        amount: 5,
        currency: "EUR",
    })
    .unwrap();
    let b = Fingerprint::of(&V2 {
        currency: "EUR",
        amount: 5,
    })
    .unwrap();
    let c = Fingerprint::of(&V2 {
        currency: "EUR",
        amount: 6,
    })
    .unwrap();
    assert_eq!(a, b);
    assert_ne!(b, c);
}

// ---- The attribute ----

static STORE: std::sync::LazyLock<MemoryStore> = std::sync::LazyLock::new(MemoryStore::new);
static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "{a}{b}", store = "&*STORE", scope = "guarantees.adjacent")]
async fn adjacent(a: &str, b: &str) -> Result<String, AppError> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{a}+{b}"))
}

/// `"{a}{b}"` made ("ab", "c") and ("a", "bc") the same key, so one order replayed the other's
/// result: adjacent parts are now kept apart.
#[tokio::test]
async fn adjacent_placeholders_never_collide() {
    assert_eq!(adjacent("ab", "c").await.unwrap(), "ab+c");
    assert_eq!(adjacent("a", "bc").await.unwrap(), "a+bc");
    assert_eq!(adjacent("ab", "c").await.unwrap(), "ab+c");
}

static RENAMED: std::sync::LazyLock<MemoryStore> = std::sync::LazyLock::new(MemoryStore::new);
static ISSUED: AtomicU32 = AtomicU32::new(0);

/// Before the rename: the scope is pinned to a stable name.
#[idempotent(key = "order_id", store = "&*RENAMED", scope = "coupons.issue")]
async fn issue_coupon(order_id: u64) -> Result<u32, AppError> {
    let _ = order_id;
    Ok(ISSUED.fetch_add(1, Ordering::SeqCst) + 1)
}

/// After the rename (and a move): the same pinned scope, so records written before it still
/// answer.
#[idempotent(key = "order_id", store = "&*RENAMED", scope = "coupons.issue")]
async fn grant_coupon(order_id: u64) -> Result<u32, AppError> {
    let _ = order_id;
    Ok(ISSUED.fetch_add(1, Ordering::SeqCst) + 1)
}

/// Renaming a handler changed its default scope and orphaned every record: with the scope pinned,
/// a duplicate after the rename replays.
#[tokio::test]
async fn a_pinned_scope_survives_a_rename() {
    let before = issue_coupon(42).await.unwrap();
    let after = grant_coupon(42).await.unwrap();
    assert_eq!(before, after);
    assert_eq!(ISSUED.load(Ordering::SeqCst), 1);
}

/// The memory store, whose first `fail` completions fail as a store that is down would.
#[derive(Clone)]
struct Flaky {
    store: MemoryStore,
    fail: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl Store for Flaky {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.store.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let left = self.fail.load(Ordering::SeqCst);
        if left > 0 {
            self.fail.store(left - 1, Ordering::SeqCst);
            return Err(StoreError::unavailable(std::io::Error::other(
                "connection reset",
            )));
        }
        self.store.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.store.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

/// A store that fails a few completions (a connection reset) must not cost the output: the mark
/// is written with it once the store answers, and duplicates replay it. (Three failures used to
/// mark the key done without its output.)
#[tokio::test]
async fn a_mark_that_fails_for_a_while_keeps_its_output() {
    let store = Flaky {
        store: MemoryStore::new(),
        fail: Arc::new(AtomicU32::new(4)),
    };
    let opts = Options::new("guarantees::flaky").ttl(Duration::from_secs(30));
    let runs = AtomicU32::new(0);
    let first: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async {
        Ok(counted(&runs) + 41)
    })
    .await;
    // The foreground gave up; the background finishes the mark.
    assert!(matches!(first, Err(Error::Unavailable { .. })), "{first:?}");
    assert!(
        wait_for_background(Duration::from_secs(10)).await,
        "never marked"
    );
    let replay: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async {
        Ok(counted(&runs) + 41)
    })
    .await;
    assert_eq!(replay.unwrap(), 42, "the output was given up");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A large output whose mark failed three times in a row (a failover) used to be taken as one
/// the store refuses for its size, and the key was marked done without it: duplicates got
/// `Unreplayable`. The store is asked first whether it is up; it is, so the output is written.
#[tokio::test]
async fn a_large_output_survives_a_short_outage() {
    let store = Flaky {
        store: MemoryStore::new(),
        fail: Arc::new(AtomicU32::new(3)),
    };
    let opts = Options::new("guarantees::flaky_large").ttl(Duration::from_secs(30));
    let big = "x".repeat(70 * 1024);
    let runs = AtomicU32::new(0);
    let first: Result<String, Error> = run(&store, &opts, Call::new("k"), || async {
        counted(&runs);
        Ok(big.clone())
    })
    .await;
    assert_eq!(first.unwrap().len(), big.len());
    let replay: Result<String, Error> = run(&store, &opts, Call::new("k"), || async {
        counted(&runs);
        Ok(String::new())
    })
    .await;
    assert_eq!(replay.unwrap(), big, "the output was given up");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The memory store, whose `extend` panics (a bug in a store, a poisoned client).
#[derive(Clone, Default)]
struct PanicsRenewing(MemoryStore);

#[async_trait::async_trait]
impl Store for PanicsRenewing {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.0.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.0.release(scope, key, lease).await
    }
    async fn extend(&self, _: &str, _: &Key, _: &Lease, _: Duration) -> Result<(), StoreError> {
        panic!("the store's client is broken")
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

/// A renewal that panicked left its lease marked as being renewed forever: it lapsed under the
/// running handler and no one told it. The panic now counts as a lost lease.
#[tokio::test]
async fn a_renewal_that_panics_tells_the_handler() {
    let store = PanicsRenewing::default();
    let opts = Options::new("guarantees::panics_renewing").ttl(Duration::from_millis(150));
    let out: Result<bool, Error> = run(&store, &opts, Call::new("order-1"), || async {
        let lease = current_lease().expect("inside a handler");
        let told = tokio::time::timeout(Duration::from_secs(10), lease.lost()).await;
        Ok(told.is_ok() && lease.is_lost())
    })
    .await;
    match out {
        Ok(told) => assert!(told, "the handler was never told its lease was lost"),
        Err(Error::LeaseLost { .. }) => {}
        Err(e) => panic!("{e}"),
    }
}
