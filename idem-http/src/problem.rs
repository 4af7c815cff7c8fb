//! The layer's own answers, as `application/problem+json` (RFC 9457). They never carry the key,
//! the scope or anything of the server's insides: a client sees what to do, not how.

use crate::body::IdemBody;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use idem_runtime::Error;
use std::time::Duration;

#[derive(Debug)]
pub(crate) enum Problem {
    MissingKey,
    InvalidKey(&'static str),
    UnidentifiedCaller,
    RequestTooLarge(usize),
    UnreadableRequest,
    InFlight,
    KeyReused,
    NotStored { too_large: bool },
    Unavailable,
    Internal,
}

impl Problem {
    /// The answer to idem's error `e`.
    pub(crate) fn of(e: &Error) -> Problem {
        match e {
            Error::InFlight { .. } => Problem::InFlight,
            Error::Mismatch { .. } => Problem::KeyReused,
            Error::InvalidKey { reason } => Problem::InvalidKey(reason),
            Error::Unreplayable { .. } => Problem::NotStored { too_large: true },
            Error::Unavailable { .. } | Error::NoStore => Problem::Unavailable,
            _ => Problem::Internal,
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str, String) {
        match self {
            Problem::MissingKey => (
                StatusCode::BAD_REQUEST,
                "missing-key",
                "Idempotency-Key required",
                "this request must carry an Idempotency-Key header".into(),
            ),
            Problem::InvalidKey(reason) => (
                StatusCode::BAD_REQUEST,
                "invalid-key",
                "Invalid Idempotency-Key",
                format!("the Idempotency-Key header is not valid: {reason}"),
            ),
            Problem::UnidentifiedCaller => (
                StatusCode::UNAUTHORIZED,
                "unidentified-caller",
                "Caller not identified",
                "an idempotent request must come from an identified caller".into(),
            ),
            Problem::RequestTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "Request too large",
                format!("an idempotent request's body may be at most {limit} bytes"),
            ),
            Problem::UnreadableRequest => (
                StatusCode::BAD_REQUEST,
                "unreadable-request",
                "Request body could not be read",
                "the request's body ended before it was complete".into(),
            ),
            Problem::InFlight => (
                StatusCode::CONFLICT,
                "in-flight",
                "A request with this Idempotency-Key is being processed",
                "retry after the time in Retry-After to get its response".into(),
            ),
            Problem::KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency-Key reused",
                "this Idempotency-Key was used for another request (another body, method or path); use a new key for a new request".into(),
            ),
            Problem::NotStored { too_large } => (
                StatusCode::GONE,
                "response-not-stored",
                "The request was processed; its response cannot be replayed",
                if *too_large {
                    "the first request with this Idempotency-Key completed, but its response was too large to keep".into()
                } else {
                    "the first request with this Idempotency-Key completed, but its response could not be read to keep it".into()
                },
            ),
            Problem::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                "the request could not be processed now; retry after the time in Retry-After".into(),
            ),
            Problem::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the request could not be processed".into(),
            ),
        }
    }

    /// The response, with `Retry-After` (in whole seconds, at least 1) where one is given.
    pub(crate) fn response(&self, retry_after: Option<Duration>) -> Response<IdemBody> {
        let (status, name, title, detail) = self.parts();
        let body = serde_json::json!({
            "type": format!("urn:idem:problem:{name}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        let mut response = Response::new(IdemBody::from(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
