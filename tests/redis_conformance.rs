//! The whole contract of `protocol.md`, proven on a single Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each check uses scopes of its own, so they share the server.
mod redis_support;
mod support;

idem_runtime::store_conformance!(redis_support::shared_store());
idem_runtime::operations_conformance!(redis_support::shared_store());
