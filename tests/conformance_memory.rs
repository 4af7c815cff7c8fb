//! The whole contract of `protocol.md`, and the operations, proven on the in-memory store, and
//! on it behind an in-process cache of done records (what the cache answers must be what the
//! store would).
idem_runtime::store_conformance!(async { idem_runtime::MemoryStore::new() });
idem_runtime::operations_conformance!(async { idem_runtime::MemoryStore::new() });

mod cached {
    use idem_runtime::{CachedStore, MemoryStore};

    idem_runtime::store_conformance!(async { CachedStore::new(MemoryStore::new()) });
    idem_runtime::operations_conformance!(async { CachedStore::new(MemoryStore::new()) });
}
