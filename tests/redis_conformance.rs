//! The whole contract of `protocol.md`, proven on a single Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each check uses scopes of its own, so they share the server.
mod redis_support;
mod support;

idem_runtime::store_conformance!(redis_support::shared_store());
idem_runtime::operations_conformance!(redis_support::shared_store());

/// The same contract through an in-process cache of done records in front of Redis: what the
/// cache answers must be what Redis would.
mod cached {
    use super::redis_support;

    async fn cached() -> Option<idem_runtime::CachedStore<idem_runtime::RedisStore>> {
        Some(idem_runtime::CachedStore::new(
            redis_support::shared_store().await?,
        ))
    }

    idem_runtime::store_conformance!(cached());
    idem_runtime::operations_conformance!(cached());
}
