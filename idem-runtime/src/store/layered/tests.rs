//! Unit tests of the layered store with fault-injecting fronts over real memory stores.

use super::*;
use crate::Fingerprint;
use crate::store::Token;
use crate::{Call, Error, MemoryStore, Options, run};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32};
use tokio::time::Instant;

/// A front whose faults the test controls: it can lose everything (a Redis flush or
/// restart), fail every call (Redis down), or never answer (a network partition). Underneath
/// it is a real `MemoryStore`.
#[derive(Clone, Default)]
struct Front(Arc<FrontState>);

#[derive(Default)]
struct FrontState {
    store: Mutex<MemoryStore>,
    down: AtomicBool,
    hang: AtomicBool,
    calls: AtomicU64,
}

impl Front {
    fn flush(&self) {
        *self.0.store.lock().unwrap() = MemoryStore::new();
    }
    fn len(&self) -> usize {
        self.0.store.lock().unwrap().len()
    }
    fn set_down(&self, down: bool) {
        self.0.down.store(down, Ordering::SeqCst);
    }
    fn calls(&self) -> u64 {
        self.0.calls.load(Ordering::SeqCst)
    }
    async fn reach(&self) -> Result<MemoryStore, StoreError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if self.0.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.0.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(std::io::Error::other(
                "connection refused",
            )));
        }
        Ok(self.0.store.lock().unwrap().clone())
    }
}

#[async_trait::async_trait]
impl Store for Front {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.reach().await?.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.reach()
            .await?
            .complete(scope, key, lease, output, keep)
            .await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.reach().await?.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.reach().await?.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

/// A durable store that can fail every call.
#[derive(Clone, Default)]
struct Durable {
    store: MemoryStore,
    down: Arc<AtomicBool>,
}

impl Durable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(std::io::Error::other(
                "database down",
            )));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for Durable {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.check()?;
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
        self.check()?;
        self.store.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.check()?;
        self.store.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

const LONG: Duration = Duration::from_secs(60);

fn req<'a>(key: &'a Key, fingerprint: Option<Fingerprint>) -> BeginRequest<'a> {
    BeginRequest {
        scope: "s",
        key,
        token: Token::generate(),
        ttl: LONG,
        fingerprint,
    }
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::of(&text).unwrap()
}

fn layered(front: &Front, durable: &Durable) -> LayeredStore<Front, Durable> {
    LayeredStore::builder(front.clone(), durable.clone())
        .front_timeout(Duration::from_millis(50))
        .front_backoff(Duration::from_millis(100))
        .build()
}

async fn done(store: &impl Store, key: &Key, fingerprint: Option<Fingerprint>, out: &[u8]) {
    let Begin::Acquired(lease) = store.begin(&req(key, fingerprint)).await.unwrap() else {
        panic!("expected Acquired")
    };
    store.complete("s", key, &lease, out, LONG).await.unwrap();
}

#[tokio::test]
async fn duplicates_are_answered_by_the_front_alone() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    done(&store, &k, None, b"out").await;
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(
        store.begin(&req(&k, None)).await.unwrap(),
        Begin::Completed {
            output: b"out".to_vec(),
            fingerprint: None,
        }
    );
}

#[tokio::test]
async fn a_front_that_lost_a_record_is_backfilled_from_the_durable_store() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    done(&store, &k, None, b"out").await;
    front.flush();
    let replay = Begin::Completed {
        output: b"out".to_vec(),
        fingerprint: None,
    };
    assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
    assert_eq!(front.len(), 1, "backfilled");
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
}

#[tokio::test]
async fn a_backfill_never_drops_the_fingerprint_check() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    done(&store, &k, Some(fp("a")), b"out").await;
    let replay = Begin::Completed {
        output: b"out".to_vec(),
        fingerprint: Some(fp("a")),
    };
    // Without a fingerprint: replayed, and the front gets the record's own fingerprint.
    front.flush();
    assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
    assert_eq!(front.len(), 1, "backfilled");
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(
        store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
        Begin::Mismatch,
        "the front answers as the durable record would"
    );
    assert_eq!(store.begin(&req(&k, Some(fp("a")))).await.unwrap(), replay);
    assert_eq!(store.begin(&req(&k, None)).await.unwrap(), replay);
}

/// Review finding: a key done without a fingerprint, replayed from the database to a call with
/// fingerprint A after a front flush, was copied to the front with A, so a later call with B got
/// `Mismatch` from the front where the database replays.
#[tokio::test]
async fn a_backfill_keeps_the_records_own_fingerprint() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    done(&store, &k, None, b"out").await;
    front.flush();
    let replay = Begin::Completed {
        output: b"out".to_vec(),
        fingerprint: None,
    };
    assert_eq!(store.begin(&req(&k, Some(fp("a")))).await.unwrap(), replay);
    assert_eq!(front.len(), 1, "backfilled");
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(
        store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
        replay,
        "the database record has no fingerprint: every payload replays"
    );
}

#[tokio::test]
async fn a_completion_after_a_flush_keeps_the_fingerprint() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(lease) = store.begin(&req(&k, Some(fp("a")))).await.unwrap() else {
        panic!()
    };
    front.flush(); // while the handler runs
    store.complete("s", &k, &lease, b"out", LONG).await.unwrap();
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(
        store.begin(&req(&k, Some(fp("b")))).await.unwrap(),
        Begin::Mismatch
    );
}

#[tokio::test]
async fn in_flight_in_the_durable_store_wins_over_an_empty_front() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(held) = store.begin(&req(&k, None)).await.unwrap() else {
        panic!()
    };
    front.flush();
    assert!(matches!(
        store.begin(&req(&k, None)).await.unwrap(),
        Begin::InFlight { .. }
    ));
    assert_eq!(front.len(), 0, "the front's claim was given back");
    // An extend puts the holder's claim back into the front.
    store.extend("s", &k, &held, LONG).await.unwrap();
    assert_eq!(front.len(), 1);
}

#[tokio::test]
async fn the_lease_carries_the_durable_fence() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    // Move the front's fence counter away from the durable one's.
    for i in 0..5 {
        let other = Key::new(&i).unwrap();
        front.begin(&req(&other, None)).await.unwrap();
    }
    let r = req(&k, None);
    let Begin::Acquired(lease) = store.begin(&r).await.unwrap() else {
        panic!()
    };
    // A retry with the same token answers each store's own lease.
    let Begin::Acquired(in_front) = front.begin(&r).await.unwrap() else {
        panic!()
    };
    assert_ne!(in_front.fence, lease.fence);
    assert_eq!(
        durable.store.begin(&r).await.unwrap(),
        Begin::Acquired(lease)
    );
    assert_eq!(store.begin(&r).await.unwrap(), Begin::Acquired(lease));
}

#[tokio::test]
async fn a_durable_failure_fails_closed_and_frees_the_front() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    durable.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        store.begin(&req(&k, None)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(front.len(), 0);
    let runs = AtomicU32::new(0);
    let out: Result<u32, Error> = run(&store, &Options::new("s"), Call::new("k"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(1)
    })
    .await;
    assert!(matches!(out, Err(Error::Unavailable { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn complete_reports_the_durable_answer() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(lease) = store.begin(&req(&k, None)).await.unwrap() else {
        panic!()
    };
    durable.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        store.complete("s", &k, &lease, b"x", LONG).await,
        Err(StoreError::Unavailable(_))
    ));
    durable.down.store(false, Ordering::SeqCst);
    // The retry succeeds and the front learns the record.
    store.complete("s", &k, &lease, b"x", LONG).await.unwrap();
    durable.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        store.begin(&req(&k, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

#[tokio::test]
async fn a_dead_front_degrades_to_the_durable_store_and_recovers() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let opts = Options::new("s");
    let runs = AtomicU32::new(0);
    let call = |k: u32| {
        let runs = &runs;
        run(&store, &opts, Call::new(&k), move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(k)
        })
    };
    assert_eq!(call(1).await.unwrap(), 1);
    front.set_down(true);
    for _ in 0..2 {
        for k in 1..20 {
            assert_eq!(call(k).await.unwrap(), k);
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 19, "each key ran once");
    assert!(store.degraded_calls() > 19);
    assert!(!store.front_available());
    // While it is down the front is skipped, not called per call.
    assert!(front.calls() < 10, "front called {} times", front.calls());

    front.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.front_available() {
        assert!(Instant::now() < deadline, "never went back to the front");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(call(1).await.unwrap(), 1);
    }
    let degraded = store.degraded_calls();
    for k in 1..40 {
        assert_eq!(call(k).await.unwrap(), k);
    }
    assert_eq!(store.degraded_calls(), degraded);
    assert_eq!(runs.load(Ordering::SeqCst), 39);
    // Keys done while the front was down were backfilled, and replay from the front now.
    assert!(front.len() >= 39);
    durable.down.store(true, Ordering::SeqCst);
    assert_eq!(call(5).await.unwrap(), 5);
}

#[tokio::test]
async fn a_front_that_hangs_costs_one_timeout_not_one_per_call() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = LayeredStore::builder(front.clone(), durable.clone())
        .front_timeout(Duration::from_millis(100))
        .front_backoff(Duration::from_secs(60))
        .build();
    front.0.hang.store(true, Ordering::SeqCst);
    let opts = Options::new("s");
    let started = Instant::now();
    for k in 0..50u32 {
        let out: Result<u32, Error> = run(&store, &opts, Call::new(&k), || async { Ok(k) }).await;
        assert_eq!(out.unwrap(), k);
    }
    // One timeout (the first call), then the front is skipped.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.front_failures(), 1);
}

#[tokio::test]
async fn a_cancelled_probe_does_not_stop_the_probing() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = LayeredStore::builder(front.clone(), durable.clone())
        .front_timeout(Duration::from_secs(30))
        .front_backoff(Duration::from_millis(20))
        .build();
    let k = Key::new("k").unwrap();
    front.set_down(true);
    store.begin(&req(&k, None)).await.unwrap();
    assert!(!store.front_available());
    // The front hangs now; the probe that finds it so is cancelled by its caller.
    front.set_down(false);
    front.0.hang.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        assert!(Instant::now() < deadline, "never probed");
        let other = Key::new(&n).unwrap();
        let r = req(&other, None);
        if tokio::time::timeout(Duration::from_millis(50), store.begin(&r))
            .await
            .is_err()
        {
            break; // this call was the probe, stuck in the front, and is now cancelled
        }
    }
    front.0.hang.store(false, Ordering::SeqCst);
    while !store.front_available() {
        assert!(Instant::now() < deadline, "never probed again");
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.begin(&req(&k, None)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_call_probes_while_the_others_skip_the_front() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = LayeredStore::builder(front.clone(), durable.clone())
        .front_timeout(Duration::from_millis(300))
        .front_backoff(Duration::from_millis(20))
        .build();
    front.set_down(true);
    store
        .begin(&req(&Key::new("k").unwrap(), None))
        .await
        .unwrap();
    assert_eq!(store.front_failures(), 1);
    front.set_down(false);
    front.0.hang.store(true, Ordering::SeqCst);
    // Let the back-off pass (the gate has no signal to wait for: its clock decides).
    tokio::time::sleep(Duration::from_millis(40)).await;
    let calls: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let k = Key::new(&n).unwrap();
                store.begin(&req(&k, None)).await.unwrap()
            })
        })
        .collect();
    for c in calls {
        assert!(matches!(c.await.unwrap(), Begin::Acquired(_)));
    }
    assert_eq!(
        store.front_failures(),
        2,
        "more than one call probed the front"
    );
}

#[tokio::test]
async fn memory_front_wait_is_signalled() {
    // The in-flight duplicate waits on the front's signal and replays the holder's output.
    let store = LayeredStore::new(MemoryStore::new(), MemoryStore::new());
    let opts = Options::new("s").wait(Duration::from_secs(10));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let first = run(&store, &opts, Call::new("k"), || async {
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(1u32)
    });
    let second = async {
        started_rx.await.unwrap();
        let dup = run(&store, &opts, Call::new("k"), || async {
            Ok::<_, Error>(2u32)
        });
        let _ = finish_tx.send(());
        dup.await
    };
    let (a, b) = tokio::join!(first, second);
    assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
}

/// A renewal that finds the front's claim gone (a flush) claims the front again, so in-flight
/// duplicates stay with the front.
#[tokio::test]
async fn a_renewal_claims_a_flushed_front_again() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(lease) = store.begin(&req(&k, None)).await.unwrap() else {
        panic!("expected Acquired")
    };
    front.flush();
    store.extend("s", &k, &lease, LONG).await.unwrap();
    let other = front.begin(&req(&k, None)).await.unwrap();
    let Begin::InFlight { retry_after } = other else {
        panic!("the front was not claimed again: {other:?}")
    };
    assert!(retry_after > Duration::from_secs(1), "{retry_after:?}");
}

/// The holder released the key (the durable store, then the front) while a renewal was under
/// way: the front's claim that renewal takes again belongs to no one, and is given back.
#[tokio::test]
async fn a_renewal_racing_a_release_leaves_the_front_free() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(lease) = store.begin(&req(&k, None)).await.unwrap() else {
        panic!("expected Acquired")
    };
    // The renewal's durable half ran before the release; its front half runs after it.
    store.release("s", &k, &lease).await.unwrap();
    store.inner.front_extend("s", &k, &lease, LONG).await;
    let next = front.begin(&req(&k, None)).await.unwrap();
    assert!(matches!(next, Begin::Acquired(_)), "{next:?}");
}

/// When the durable lease cannot be checked (the database is down), the front's claim taken
/// again is short: it cannot outlive a holder that released the key by much.
#[tokio::test]
async fn a_front_claim_taken_again_unchecked_is_short() {
    let (front, durable) = (Front::default(), Durable::default());
    let store = layered(&front, &durable);
    let k = Key::new("k").unwrap();
    let Begin::Acquired(lease) = store.begin(&req(&k, None)).await.unwrap() else {
        panic!("expected Acquired")
    };
    front.flush();
    durable.down.store(true, Ordering::SeqCst);
    store.inner.front_extend("s", &k, &lease, LONG).await;
    let other = front.begin(&req(&k, None)).await.unwrap();
    let Begin::InFlight { retry_after } = other else {
        panic!("the front was not claimed again: {other:?}")
    };
    assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}");
}
