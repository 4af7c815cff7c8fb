//! The response stored under a completed key, and its replay.

use crate::body::IdemBody;
use crate::layer::REPLAYED;
use crate::problem::Problem;
use bytes::Bytes;
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// What a completed key holds: the response, or why it could not be kept.
#[derive(Serialize, Deserialize)]
pub(crate) enum Stored {
    Response {
        status: u16,
        headers: Vec<(String, serde_bytes::ByteBuf)>,
        body: serde_bytes::ByteBuf,
        #[serde(default)]
        trailers: Vec<(String, serde_bytes::ByteBuf)>,
    },
    /// The handler completed (status `status`), but its response was not stored: larger than
    /// the limit, or its body failed while it was read. A retry must not run it again.
    NotStored { status: u16, too_large: bool },
}

/// Headers that describe one connection or one transfer, not the response: never replayed
/// (`Trailer` is: it announces the trailers, which are replayed).
fn replayable(name: &HeaderName) -> bool {
    use http::header::*;
    !matches!(
        *name,
        CONNECTION
            | TRANSFER_ENCODING
            | TE
            | UPGRADE
            | CONTENT_LENGTH
            | DATE
            | SET_COOKIE
            | PROXY_AUTHENTICATE
    ) && name.as_str() != "keep-alive"
        && name != REPLAYED
}

impl Stored {
    /// The record of a response with head `parts`, its body still to come.
    pub(crate) fn head(parts: &Parts) -> Stored {
        Stored::Response {
            status: parts.status.as_u16(),
            headers: pairs(&parts.headers),
            body: serde_bytes::ByteBuf::new(),
            trailers: Vec::new(),
        }
    }

    /// This record (of [`head`](Stored::head)) with its body and trailers.
    pub(crate) fn with_body(self, bytes: Bytes, with: Option<HeaderMap>) -> Stored {
        match self {
            Stored::Response {
                status, headers, ..
            } => Stored::Response {
                status,
                headers,
                body: serde_bytes::ByteBuf::from(Vec::from(bytes)),
                trailers: with.as_ref().map(pairs).unwrap_or_default(),
            },
            other => other,
        }
    }

    /// This record (of [`head`](Stored::head)) as one of a response that was not kept.
    pub(crate) fn not_stored(self, too_large: bool) -> Stored {
        let status = match &self {
            Stored::Response { status, .. } | Stored::NotStored { status, .. } => *status,
        };
        Stored::NotStored { status, too_large }
    }

    /// The response a retry gets.
    pub(crate) fn replay(self) -> Response<IdemBody> {
        match self {
            Stored::Response {
                status,
                headers,
                body,
                trailers,
            } => {
                let trailers = (!trailers.is_empty()).then(|| map(trailers));
                let body = IdemBody::stored(Bytes::from(body.into_vec()), trailers);
                let mut response = Response::new(body);
                *response.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                *response.headers_mut() = map(headers);
                response
                    .headers_mut()
                    .insert(REPLAYED, HeaderValue::from_static("true"));
                response
            }
            Stored::NotStored { too_large, .. } => {
                let mut response = Problem::NotStored { too_large }.response(None);
                response
                    .headers_mut()
                    .insert(REPLAYED, HeaderValue::from_static("true"));
                response
            }
        }
    }
}

/// The headers kept of `headers`, as stored.
fn pairs(headers: &HeaderMap) -> Vec<(String, serde_bytes::ByteBuf)> {
    headers
        .iter()
        .filter(|(name, _)| replayable(name))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                serde_bytes::ByteBuf::from(value.as_bytes().to_vec()),
            )
        })
        .collect()
}

/// Stored headers back as a map. Written by this layer from valid headers: a pair that does not
/// parse back was not written by it, and is left out.
fn map(pairs: Vec<(String, serde_bytes::ByteBuf)>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            map.append(name, value);
        }
    }
    map
}
