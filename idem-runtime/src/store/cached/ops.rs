//! The operations through the cached store (see [`Operations`]): read from the store underneath;
//! a key changed there is dropped from the cache too, after the change, so no duplicate of this
//! process is answered with the record an operator just forgot.

use super::CachedStore;
use crate::store::ops::{Changed, Counts, KeyState, ListQuery, Operations, Page};
use crate::{Key, Store, StoreError};

#[async_trait::async_trait]
impl<S: Store + Operations> Operations for CachedStore<S> {
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        self.inner.inspect(scope, key).await
    }

    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(scope, query).await
    }

    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        self.inner.counts(scope).await
    }

    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        // Also when the store failed, or the future is dropped while the store answers: it may
        // have forgotten the key before the error, or before its answer was read.
        let _drop = DropOnExit(self, scope, key);
        self.inner.forget(scope, key, force).await
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        let _drop = DropOnExit(self, scope, key);
        self.inner.release_stuck(scope, key, force).await
    }
}

/// Drops the key's cached record when the operation ends, however it ends (an answer, an error,
/// or its future dropped: an admin request whose client went away).
struct DropOnExit<'a, S>(&'a CachedStore<S>, &'a str, &'a Key);

impl<S> Drop for DropOnExit<'_, S> {
    fn drop(&mut self) {
        self.0.table.remove(self.1, self.2);
    }
}
