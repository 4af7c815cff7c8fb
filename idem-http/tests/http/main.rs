#![allow(missing_docs, unreachable_pub)]
//! The `Idempotency-Key` layer against a real axum server on a loopback port, a real HTTP
//! client, and the real stores.

mod attribute;
mod processes;
/// Private Redis servers and clusters, shared with the workspace's other tests.
#[path = "../../../tests/redis_support/mod.rs"]
mod redis_support;
mod review;
mod review2;
mod semantics;
/// `in_ci` and `server_missing`, shared with the workspace's other tests.
#[path = "../../../tests/support/mod.rs"]
mod shared;
mod support;
mod tx_processes;
