//! The operations through the layered store (see [`Operations`]): the durable store is the truth
//! for what is read; what is changed is changed there first, then in the front.

use super::LayeredStore;
use crate::store::ops::{Changed, Counts, KeyState, ListQuery, Operations, Page};
use crate::{Key, Store, StoreError};

impl<F: Store + Operations, D: Store + Operations> LayeredStore<F, D> {
    /// Carry a change made in the durable store over to the front, forced (the front's claim of
    /// the holder is a lease like any other). Durable first: meanwhile the front can only
    /// replay the old record or refuse the key as in flight, and whatever it lets through is
    /// claimed in the durable store, which already has the change. The other order would let a
    /// duplicate copy the durable record back into the front before the durable change.
    async fn both(&self, scope: &str, key: &Key, durable: Changed) -> Result<Changed, StoreError> {
        match durable {
            // Nothing more may be changed than the durable store allowed.
            Changed::Refused { .. } => Ok(durable),
            // Freed now, or already free (a retry after the front failed): the front too.
            Changed::Freed { .. } | Changed::NotFound => {
                match self.front().forget(scope, key, true).await {
                    Ok(_) => Ok(durable),
                    Err(e) => Err(StoreError::unavailable(format!(
                        "changed in the durable store, but not in the front ({e}): run it again"
                    ))),
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl<F: Store + Operations, D: Store + Operations> Operations for LayeredStore<F, D> {
    /// The durable store's record: the truth (see [`LayeredStore::inspect_front`] for the
    /// front's).
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        self.durable().inspect(scope, key).await
    }

    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        self.durable().list(scope, query).await
    }

    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        self.durable().counts(scope).await
    }

    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        let durable = self.durable().forget(scope, key, force).await?;
        self.both(scope, key, durable).await
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        let durable = self.durable().release_stuck(scope, key, force).await?;
        self.both(scope, key, durable).await
    }
}

impl<F: Store + Operations, D> LayeredStore<F, D> {
    /// The front's record of the key (a cache of the durable one, or the front's claim).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{KeyState, LayeredStore, MemoryStore};
    /// let store = LayeredStore::new(MemoryStore::new(), MemoryStore::new());
    /// let key = idem_runtime::Key::new("k").unwrap();
    /// assert_eq!(store.inspect_front("s", &key).await.unwrap(), KeyState::Absent);
    /// # });
    /// ```
    pub async fn inspect_front(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        self.front().inspect(scope, key).await
    }
}
