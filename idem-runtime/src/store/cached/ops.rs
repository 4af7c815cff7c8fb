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
        let changed = self.inner.forget(scope, key, force).await;
        // Also when the store failed: it may have forgotten the key before the error.
        self.table.remove(scope, key);
        changed
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        let changed = self.inner.release_stuck(scope, key, force).await;
        self.table.remove(scope, key);
        changed
    }
}
