//! An `Idempotency-Key` layer for tower and axum, on any idem store.
//!
//! A client that retries a `POST` (a timeout, a double click, a mobile network) sends the same
//! `Idempotency-Key` header again; the layer makes the route's effect happen once and answers the
//! retry with the first response, as Stripe and the IETF httpapi draft
//! (`draft-ietf-httpapi-idempotency-key-header`) describe.
//!
//! A first request runs the handler and its 2xx/3xx response is stored; a retry with the same
//! key and payload gets it back with `Idempotent-Replayed: true`; a copy while the first runs
//! gets `409` with `Retry-After`; the same key with another payload, method or path gets `422`;
//! a missing (where required) or malformed key `400`; a 5xx is passed through and releases the
//! key. The whole status table, each row with the test that holds it, is in the repository's
//! README (section "HTTP").
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

#[cfg(feature = "axum")]
mod axum;
mod body;
mod fingerprint;
mod layer;
mod problem;
mod relay;
mod service;
mod stored;

#[cfg(feature = "axum")]
pub use axum::{IdemError, IdempotencyKey, KeyRejection};
pub use body::IdemBody;
pub use layer::{IdempotencyLayer, REPLAYED};
pub use service::Idempotency;
