//! What `#[idempotent]` does at run time, on the memory store: the forms of the attribute behave
//! as the README says.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{Error, MemoryStore, idempotent};
use tokio::sync::{Barrier, oneshot};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error("business failure")]
    Business,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Coupon {
    order: u64,
    code: String,
}

struct Service {
    idem: MemoryStore,
    runs: AtomicU32,
}

impl Service {
    fn new() -> Self {
        Service {
            idem: MemoryStore::new(),
            runs: AtomicU32::new(0),
        }
    }

    #[idempotent(
        key = "order_id",
        store = "self.idem",
        ttl = "10s",
        scope = "tests.issue"
    )]
    async fn issue(&self, order_id: u64, fail: bool) -> Result<Coupon, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if fail {
            return Err(AppError::Business);
        }
        Ok(Coupon {
            order: order_id,
            code: format!("C{order_id}"),
        })
    }

    #[idempotent(
        key = "{tenant}:{order_id}",
        store = "self.idem",
        scope = "tests.by_tenant"
    )]
    async fn by_tenant(&self, tenant: &str, order_id: &str) -> Result<String, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{tenant}/{order_id}"))
    }

    #[idempotent(
        key = "key",
        store = "self.idem",
        fingerprint = "amount",
        scope = "tests.charge"
    )]
    async fn charge(&self, key: String, amount: u32) -> Result<u32, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(amount)
    }

    #[idempotent(key = "id", store = "self.idem", wait = "10s", scope = "tests.slow")]
    async fn slow(
        &self,
        id: u64,
        started: oneshot::Sender<()>,
        finish: oneshot::Receiver<()>,
    ) -> Result<u64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let _ = started.send(());
        let _ = finish.await;
        Ok(id * 10)
    }

    #[idempotent(key = "id", store = "self.idem", scope = "tests.held")]
    async fn held(
        &self,
        id: u64,
        started: oneshot::Sender<()>,
        finish: oneshot::Receiver<()>,
    ) -> Result<u64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let _ = started.send(());
        let _ = finish.await;
        Ok(id * 10)
    }

    #[idempotent(key = "id", store = "self.idem", scope = "tests.panics")]
    async fn panics(&self, id: u64, panic: bool) -> Result<u64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        assert!(!panic, "handler panicked");
        Ok(id)
    }

    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn duplicates_replay_the_stored_output() {
    let s = Service::new();
    let first = s.issue(7, false).await.unwrap();
    for _ in 0..5 {
        assert_eq!(s.issue(7, false).await.unwrap(), first);
    }
    assert_eq!(s.runs(), 1);
    s.issue(8, false).await.unwrap();
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn a_failure_releases_the_key_for_the_redelivery() {
    let s = Service::new();
    assert!(matches!(s.issue(9, true).await, Err(AppError::Business)));
    assert_eq!(s.issue(9, false).await.unwrap().order, 9);
    assert_eq!(s.issue(9, false).await.unwrap().order, 9);
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn a_panic_releases_the_key_and_resumes() {
    let s = Arc::new(Service::new());
    let s2 = s.clone();
    let joined = tokio::spawn(async move { s2.panics(1, true).await }).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(s.panics(1, false).await.unwrap(), 1);
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn template_parts_never_collide() {
    let s = Service::new();
    assert_eq!(s.by_tenant("a:b", "c").await.unwrap(), "a:b/c");
    // Same text once joined ("a:b:c"), but another pair of parts: a different key.
    assert_eq!(s.by_tenant("a", "b:c").await.unwrap(), "a/b:c");
    assert_eq!(s.by_tenant("a:b", "c").await.unwrap(), "a:b/c");
    assert_eq!(s.runs(), 2);
}

#[tokio::test]
async fn fingerprint_mismatch_is_refused() {
    let s = Service::new();
    assert_eq!(s.charge("k1".into(), 100).await.unwrap(), 100);
    assert_eq!(s.charge("k1".into(), 100).await.unwrap(), 100);
    let other = s.charge("k1".into(), 250).await;
    assert!(
        matches!(other, Err(AppError::Idem(Error::Mismatch { .. }))),
        "{other:?}"
    );
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn in_flight_duplicate_is_refused_by_default() {
    let s = Service::new();
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let holder = s.held(5, started_tx, finish_rx);
    let dup = async {
        started_rx.await.unwrap();
        let (tx, _) = oneshot::channel();
        let refused = s.held(5, tx, oneshot::channel().1).await;
        let _ = finish_tx.send(());
        refused
    };
    let (holder, refused) = tokio::join!(holder, dup);
    assert_eq!(holder.unwrap(), 50);
    match refused {
        Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60))
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert_eq!(s.runs(), 1);
}

#[tokio::test]
async fn in_flight_duplicate_with_wait_gets_the_holders_output() {
    let s = Service::new();
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let holder = s.slow(6, started_tx, finish_rx);
    let dup = async {
        started_rx.await.unwrap();
        let (tx, _) = oneshot::channel();
        let dup = s.slow(6, tx, oneshot::channel().1);
        let mut dup = std::pin::pin!(dup);
        // Still waiting while the holder runs: neither run nor refused.
        assert!(futures_poll_once(dup.as_mut()).await.is_none());
        let _ = finish_tx.send(());
        dup.await
    };
    let (holder, dup) = tokio::join!(holder, dup);
    assert_eq!(holder.unwrap(), 60);
    assert_eq!(dup.unwrap(), 60);
    assert_eq!(s.runs(), 1);
}

/// Poll a future once: `Some(output)` if it finished, `None` if it is pending.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_duplicates_with_wait_all_get_the_one_output() {
    const TASKS: usize = 32;
    let s = Arc::new(Service::new());
    let barrier = Arc::new(Barrier::new(TASKS + 1));
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let mut finish_rx = Some(finish_rx);
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (s, barrier) = (s.clone(), barrier.clone());
        let (started, _) = oneshot::channel();
        // One caller holds the real `finish`; the others' handlers would return at once if run.
        let finish = finish_rx.take().unwrap_or_else(|| oneshot::channel().1);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            s.slow(77, started, finish).await
        }));
    }
    barrier.wait().await;
    // Whoever won holds the key until `finish` (or returns at once if its `finish` was dropped).
    let _ = finish_tx.send(());
    let mut outputs = HashMap::new();
    for t in tasks {
        *outputs.entry(t.await.unwrap().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(outputs, HashMap::from([(770, TASKS)]));
    assert_eq!(s.runs(), 1, "the effect ran more than once");
}

mod default_store {
    use super::*;

    static RUNS: AtomicU32 = AtomicU32::new(0);

    #[idempotent(key = "msg.order_id", ttl = "30s")]
    #[tracing::instrument]
    async fn on_message(msg: &OrderPaid) -> Result<u64, AppError> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(msg.order_id)
    }

    #[derive(Debug)]
    struct OrderPaid {
        order_id: u64,
        message_id: u32,
    }

    #[tokio::test]
    async fn the_business_key_not_the_message_id_decides() {
        let _ = idem_runtime::install_default_store(MemoryStore::new());
        for message_id in 0..3 {
            let msg = OrderPaid {
                order_id: 4242,
                message_id,
            };
            assert_eq!(on_message(&msg).await.unwrap(), 4242);
            assert_eq!(msg.message_id, message_id);
        }
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    }
}

#[cfg(feature = "uuid")]
mod uuid_keys {
    use super::*;

    #[idempotent(key = "request", store = "store")]
    async fn by_uuid(store: &MemoryStore, request: uuid::Uuid, n: u32) -> Result<u32, AppError> {
        Ok(n)
    }

    #[tokio::test]
    async fn a_uuid_is_a_key() {
        let store = MemoryStore::new();
        let id = uuid::Uuid::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8);
        assert_eq!(by_uuid(&store, id, 1).await.unwrap(), 1);
        assert_eq!(by_uuid(&store, id, 2).await.unwrap(), 1);
        assert_eq!(by_uuid(&store, uuid::Uuid::nil(), 3).await.unwrap(), 3);
    }
}

/// Associated fns without `self` in two impls of one module: the default scope would be the same
/// for both (module path and fn name), so they must name theirs, and then keep apart.
mod two_impls_of_one_module {
    use super::*;

    static CHARGES: AtomicU32 = AtomicU32::new(0);
    static REFUNDS: AtomicU32 = AtomicU32::new(0);

    trait Job {
        async fn run(store: &MemoryStore, id: u64) -> Result<String, AppError>;
    }

    struct Charge;
    struct Refund;

    impl Job for Charge {
        #[idempotent(key = "id", store = "store", scope = "jobs.charge")]
        async fn run(store: &MemoryStore, id: u64) -> Result<String, AppError> {
            CHARGES.fetch_add(1, Ordering::SeqCst);
            Ok(format!("charged order {id}"))
        }
    }

    impl Job for Refund {
        #[idempotent(key = "id", store = "store", scope = "jobs.refund")]
        async fn run(store: &MemoryStore, id: u64) -> Result<String, AppError> {
            REFUNDS.fetch_add(1, Ordering::SeqCst);
            Ok(format!("refunded order {id}"))
        }
    }

    #[tokio::test]
    async fn associated_fns_of_two_impls_with_scopes_keep_their_outputs_apart() {
        let store = MemoryStore::new();
        assert_eq!(Charge::run(&store, 7).await.unwrap(), "charged order 7");
        assert_eq!(Refund::run(&store, 7).await.unwrap(), "refunded order 7");
        // Duplicates replay their own impl's output.
        assert_eq!(Refund::run(&store, 7).await.unwrap(), "refunded order 7");
        assert_eq!(Charge::run(&store, 7).await.unwrap(), "charged order 7");
        assert_eq!(CHARGES.load(Ordering::SeqCst), 1);
        assert_eq!(REFUNDS.load(Ordering::SeqCst), 1);
    }
}

/// The attribute on the methods of an `#[async_trait]` impl, called through a trait object.
mod async_trait_impl {
    use super::*;

    #[async_trait::async_trait]
    trait Handler: Send + Sync {
        async fn handle(&self, order: u64, note: String) -> Result<Coupon, AppError>;
    }

    struct Coupons {
        idem: MemoryStore,
        runs: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Handler for Coupons {
        #[idempotent(key = "order", store = "self.idem", scope = "tests.async_trait")]
        async fn handle(&self, order: u64, note: String) -> Result<Coupon, AppError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(Coupon {
                order,
                code: format!("C{order}-{note}"),
            })
        }
    }

    #[tokio::test]
    async fn a_method_of_an_async_trait_impl_runs_once_and_replays() {
        let coupons = Coupons {
            idem: MemoryStore::new(),
            runs: AtomicU32::new(0),
        };
        let handler: &dyn Handler = &coupons;
        let first = handler.handle(5, "first".into()).await.unwrap();
        assert_eq!(first.code, "C5-first");
        // The duplicate is replayed: the first output, the body not run.
        let second = handler.handle(5, "second".into()).await.unwrap();
        assert_eq!(second, first);
        assert_eq!(coupons.runs.load(Ordering::SeqCst), 1);
        // Spawnable: the boxed future is `Send`.
        let coupons = Arc::new(coupons);
        let spawned = tokio::spawn({
            let coupons = coupons.clone();
            async move { coupons.handle(6, "spawned".into()).await }
        });
        assert_eq!(spawned.await.unwrap().unwrap().order, 6);
        assert_eq!(coupons.runs.load(Ordering::SeqCst), 2);
    }
}
