//! An `Idempotency-Key` layer for tower and axum, on any idem store.
//!
//! A client that retries a `POST` (a timeout, a double click, a mobile network) sends the same
//! `Idempotency-Key` header again; the layer makes the route's effect happen once and answers the
//! retry with the first response, as Stripe and the IETF httpapi draft
//! (`draft-ietf-httpapi-idempotency-key-header`) describe:
//!
//! | request | answer |
//! |---|---|
//! | first request with a key | the handler runs; a 2xx/3xx response (also 4xx with [`store_client_errors`](IdempotencyLayer::store_client_errors)) is stored |
//! | the same key again, same payload | the stored response (status, headers, body), with `Idempotent-Replayed: true` |
//! | the same key while the first request runs | `409`, `Retry-After` (seconds, [`retry_after`](IdempotencyLayer::retry_after)) |
//! | the same key with another body, method or path | `422` (never the other request's response) |
//! | no key, on a route that requires one | `400` (routes made [`optional`](IdempotencyLayer::optional) pass it through) |
//! | a malformed key (empty, over 255 characters, not visible ASCII) | `400` |
//! | a request body over [`max_request_body`](IdempotencyLayer::max_request_body) | `413`, nothing claimed |
//! | the handler answers 5xx, or fails | passed through; the key is released, so the retry runs |
//! | a completed key whose response was too large to store | the first client gets it whole; a retry gets `410` |
//! | the store is unreachable | `503`, `Retry-After` |
//!
//! Errors are `application/problem+json` (RFC 9457) with a `type` of the form
//! `urn:idem:problem:<name>`; they never show the key, the scope or a module path.
//!
//! Safe methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`) pass through untouched. The fingerprint
//! that tells "another payload" covers the method, the path and query, the headers named with
//! [`fingerprint_header`](IdempotencyLayer::fingerprint_header), and the body (a JSON body in a
//! canonical form: reordered fields are the same payload). Keys are scoped per caller with
//! [`caller`](IdempotencyLayer::caller), so two clients that pick the same key never see each
//! other's responses.
//!
//! The handler runs on a task of its own: a client that disconnects after sending its request
//! does not cancel a handler that has started; its response is stored for the retry.
//!
//! ```
//! use axum::{Router, routing::post};
//! use idem_http::IdempotencyLayer;
//! use idem_runtime::MemoryStore;
//!
//! async fn pay() -> &'static str {
//!     "paid"
//! }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(pay))
//!     .layer(IdempotencyLayer::new(MemoryStore::new(), "payments"));
//! ```
#![forbid(unsafe_code)]

mod body;
mod fingerprint;
mod layer;
mod problem;
mod service;
mod stored;

pub use body::IdemBody;
pub use layer::{IdempotencyLayer, REPLAYED};
pub use service::Idempotency;
