//! The layered store on two in-memory stores (no server needed): the whole conformance suite.
//! The Redis + PostgreSQL layering runs the same suite in `tests/layered_conformance.rs`.

idem_runtime::store_conformance!(async {
    idem_runtime::LayeredStore::new(
        idem_runtime::MemoryStore::new(),
        idem_runtime::MemoryStore::new(),
    )
});

idem_runtime::operations_conformance!(async {
    idem_runtime::LayeredStore::new(
        idem_runtime::MemoryStore::new(),
        idem_runtime::MemoryStore::new(),
    )
});
