//! The calls of this process waiting for in-flight keys of a Redis store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The calls of this process waiting for in-flight keys, by record key. Completing or releasing
/// a key wakes its waiters at once; when nobody waits this costs one atomic load.
#[derive(Default)]
pub(super) struct Waiters {
    count: AtomicUsize,
    by_key: Mutex<HashMap<Vec<u8>, Arc<Notify>>>,
}

impl Waiters {
    fn map(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Arc<Notify>>> {
        // Each update is one map operation: a panic cannot leave it half-done.
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn register(&self, record: &[u8]) -> Waiter<'_> {
        let notify = self.map().entry(record.to_vec()).or_default().clone();
        self.count.fetch_add(1, Ordering::SeqCst);
        Waiter {
            waiters: self,
            record: record.to_vec(),
            notify,
        }
    }

    pub(super) fn wake(&self, record: &[u8]) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(n) = self.map().get(record) {
            n.notify_waiters();
        }
    }
}

/// One waiting call; unregisters on drop.
pub(super) struct Waiter<'a> {
    waiters: &'a Waiters,
    record: Vec<u8>,
    pub(super) notify: Arc<Notify>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.waiters.count.fetch_sub(1, Ordering::SeqCst);
        let mut map = self.waiters.map();
        // The map's handle and ours: we are the last waiter of this key.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.record);
        }
    }
}

/// Wakes a key's waiters when dropped: after the operation, however it ended.
pub(super) struct Wake<'a>(pub(super) &'a Waiters, pub(super) &'a [u8]);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.wake(self.1);
    }
}
