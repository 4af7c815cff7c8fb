//! The lease watchdog: a renewal that hangs does not stop the next one, and a lost lease stops
//! renewals. The store is the real memory store; the wrapper around it only injects the failure
//! (a hung or refused `extend`), because that is the wrapper's behaviour under test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{
    Begin, BeginRequest, Call, Error, Key, Lease, MemoryStore, Options, Store, StoreError, run,
};
use tokio::sync::oneshot;

/// The memory store, with `extend` hanging for its first `hang` calls, or refusing with
/// `LeaseLost` when `lose` is set; counts the calls.
struct Faulty {
    inner: MemoryStore,
    hang: u32,
    lose: bool,
    extends: AtomicU32,
}

/// The watchdog renews through this: the same store, behind an `Arc`.
struct Shared(Arc<Faulty>);

#[async_trait::async_trait]
impl Store for Shared {
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
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(Shared(self.0.clone()))
    }
}

#[async_trait::async_trait]
impl Store for Faulty {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.inner.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let n = self.extends.fetch_add(1, Ordering::SeqCst);
        if self.lose {
            return Err(StoreError::LeaseLost);
        }
        if n < self.hang {
            std::future::pending::<()>().await;
        }
        self.inner.extend(scope, key, lease, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        unreachable!("the tests use `Shared`")
    }
}

const TTL: Duration = Duration::from_millis(300);

/// Runs a handler for over 3 ttls and, 3 ttls in, tries a duplicate. Returns both results.
async fn slow_call_with_duplicate(store: Shared) -> (Result<u32, Error>, Result<u32, Error>) {
    let opts = Options::with_scope("renewal").ttl(TTL);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let slow = run(&store, &opts, Call::new(&1u8), || async {
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(1u32)
    });
    let duplicate = async {
        started_rx.await.unwrap();
        tokio::time::sleep(TTL * 3).await;
        let dup = run(&store, &opts, Call::new(&1u8), || async {
            Ok::<_, Error>(2u32)
        })
        .await;
        let _ = finish_tx.send(());
        dup
    };
    tokio::join!(slow, duplicate)
}

#[tokio::test]
async fn a_hung_renewal_is_abandoned_and_retried() {
    let store = Arc::new(Faulty {
        inner: MemoryStore::new(),
        hang: 1,
        lose: false,
        extends: AtomicU32::new(0),
    });
    let (slow, dup) = slow_call_with_duplicate(Shared(store.clone())).await;
    assert_eq!(slow.unwrap(), 1);
    // The lease stayed alive although the first renewal never returned.
    assert!(matches!(dup, Err(Error::InFlight { .. })), "{dup:?}");
    assert!(store.extends.load(Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn a_lost_lease_stops_renewals() {
    let store = Arc::new(Faulty {
        inner: MemoryStore::new(),
        hang: 0,
        lose: true,
        extends: AtomicU32::new(0),
    });
    let (slow, dup) = slow_call_with_duplicate(Shared(store.clone())).await;
    assert_eq!(
        store.extends.load(Ordering::SeqCst),
        1,
        "renewed after LeaseLost"
    );
    // The lease lapsed, the duplicate took the key over and completed; the first holder's
    // completion is refused and the new holder's record stands.
    assert_eq!(dup.unwrap(), 2);
    assert!(matches!(slow, Err(Error::LeaseLost { .. })), "{slow:?}");
}
