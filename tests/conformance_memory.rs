//! The whole contract of `protocol.md`, and the operations, proven on the in-memory store.
idem_runtime::store_conformance!(async { idem_runtime::MemoryStore::new() });
idem_runtime::operations_conformance!(async { idem_runtime::MemoryStore::new() });
