//! For `#[idempotent]` on axum handlers themselves: the key as an extractor, and idem's errors
//! as responses.

use crate::problem::Problem;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use std::time::Duration;

/// The request's `Idempotency-Key` header, checked (1 to 255 visible ASCII characters, bare or
/// in the IETF draft's quoted form): an extractor for handlers that take the key themselves,
/// e.g. with `#[idempotent(key = "key")]`. A request without the header, or with a malformed
/// one, is answered `400` (problem+json) before the handler runs; take
/// `Option<IdempotencyKey>` where the header is optional.
///
/// ```
/// use axum::{Router, routing::post};
/// use idem_http::{IdemError, IdempotencyKey};
/// use idem_runtime::{KeyPart, idempotent};
///
/// #[idempotent(key = "key", scope = "payments.create")]
/// async fn pay(key: IdempotencyKey, amount: String) -> Result<String, IdemError> {
///     Ok(format!("paid {amount}"))
/// }
///
/// let mut text = String::new();
/// IdempotencyKey("k-1".into()).write_key(&mut text);
/// assert_eq!(text, "k-1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

impl idem_runtime::KeyPart for IdempotencyKey {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out)
    }
}

/// `Option<IdempotencyKey>` (the header where a route makes it optional) is an optional key, also
/// in a template: a request without the header runs its handler as a plain call.
impl idem_runtime::OptionalKey for IdempotencyKey {}

/// Why [`IdempotencyKey`] refused a request: answered as `400` problem+json.
#[derive(Debug)]
pub struct KeyRejection(Problem);

impl IntoResponse for KeyRejection {
    fn into_response(self) -> Response {
        self.0.response(None).map(axum::body::Body::new)
    }
}

fn header(parts: &Parts) -> Result<Option<String>, KeyRejection> {
    crate::service::header_key(
        &parts.headers,
        &http::HeaderName::from_static("idempotency-key"),
    )
    .map_err(KeyRejection)
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, KeyRejection> {
        header(parts)?
            .map(IdempotencyKey)
            .ok_or(KeyRejection(Problem::MissingKey))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, KeyRejection> {
        Ok(header(parts)?.map(IdempotencyKey))
    }
}

/// idem's error as an HTTP answer, the layer's own: `409` with `Retry-After` in flight, `422`
/// for a reused key, `503` when the store is down, ... as problem+json that shows neither the
/// key nor the scope. Use it as a handler's error type, or wrap idem's errors in yours:
///
/// ```
/// use axum::response::{IntoResponse, Response};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error(transparent)]
///     Idem(#[from] idem_runtime::Error),
///     #[error("card declined")]
///     Declined,
/// }
///
/// impl IntoResponse for AppError {
///     fn into_response(self) -> Response {
///         match self {
///             AppError::Idem(e) => idem_http::IdemError(e).into_response(),
///             AppError::Declined => (http::StatusCode::PAYMENT_REQUIRED, "declined").into_response(),
///         }
///     }
/// }
/// ```
#[derive(Debug)]
pub struct IdemError(pub idem_runtime::Error);

impl From<idem_runtime::Error> for IdemError {
    fn from(e: idem_runtime::Error) -> IdemError {
        IdemError(e)
    }
}

impl std::fmt::Display for IdemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IdemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl IntoResponse for IdemError {
    fn into_response(self) -> Response {
        let retry_after = match &self.0 {
            // The lease left bounds it; a second is what a request usually takes.
            idem_runtime::Error::InFlight { retry_after, .. } => {
                Some((*retry_after).min(Duration::from_secs(1)))
            }
            idem_runtime::Error::Unavailable { .. } | idem_runtime::Error::NoStore => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        };
        let problem = Problem::of(&self.0);
        if matches!(problem, Problem::Internal) {
            tracing::error!(error = %self.0, "idempotent handler failed");
        }
        problem.response(retry_after).map(axum::body::Body::new)
    }
}
