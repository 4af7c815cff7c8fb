//! Shadow mode is sold for adopting idem "without changing behaviour yet": nothing is refused or
//! replayed. But a store that fails *after* the handler ran (the done mark) still turns the
//! handler's `Ok` into idem's error, so the consumer does not ack, the delivery comes back, and
//! shadow mode runs the handler again: an effect twice that the consumer without idem would
//! have had once. (Process-wide switch: a binary of its own.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::{
    Begin, BeginRequest, Call, Error, Key, Lease, MemoryStore, Options, Store, StoreError, observe,
    run, set_shadow,
};

/// A memory store whose done marks never land (the store went away between claim and mark).
#[derive(Clone)]
struct MarkFails(MemoryStore);

#[async_trait::async_trait]
impl Store for MarkFails {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.0.begin(req).await
    }
    async fn complete(
        &self,
        _: &str,
        _: &Key,
        _: &Lease,
        _: &[u8],
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::unavailable("connection reset (injected)"))
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
        Arc::new(self.clone())
    }
}

#[tokio::test]
async fn shadow_mode_runs_a_handler_twice_when_its_mark_fails_although_without_idem_it_runs_once() {
    set_shadow(true);
    let store = MarkFails(MemoryStore::new());
    let opts = Options::new("shadow.mark").ttl(Duration::from_secs(1));
    let runs = AtomicU32::new(0);
    // A consumer loop: ack on `Ok`, otherwise the broker delivers the message again.
    let mut answers = Vec::new();
    for _delivery in 0..3 {
        let (out, report) = observe(run(&store, &opts, Call::new("order-1"), || async {
            Ok::<u32, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1)
        }))
        .await;
        let acked = out.is_ok();
        answers.push((out.map_err(|e| e.to_string()), report.map(|r| r.outcome)));
        if acked {
            break;
        }
    }
    set_shadow(false);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "in shadow mode the handler ran {} times; each delivery got {answers:?}",
        runs.load(Ordering::SeqCst)
    );
}
