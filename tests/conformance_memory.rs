//! The whole contract of `protocol.md`, proven on the in-memory store.
idem_runtime::store_conformance!(async { idem_runtime::MemoryStore::new() });
