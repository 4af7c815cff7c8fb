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
    },
    /// The handler completed (status `status`), but its response was not stored: larger than
    /// the limit, or its body failed while it was read. A retry must not run it again.
    NotStored { status: u16, too_large: bool },
}

/// Headers that describe one connection or one transfer, not the response: never replayed.
fn replayable(name: &HeaderName) -> bool {
    use http::header::*;
    !matches!(
        *name,
        CONNECTION
            | TRANSFER_ENCODING
            | TE
            | TRAILER
            | UPGRADE
            | CONTENT_LENGTH
            | DATE
            | SET_COOKIE
            | PROXY_AUTHENTICATE
    ) && name.as_str() != "keep-alive"
        && name != REPLAYED
}

impl Stored {
    pub(crate) fn of(parts: &Parts, body: &Bytes) -> Stored {
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| replayable(name))
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    serde_bytes::ByteBuf::from(value.as_bytes().to_vec()),
                )
            })
            .collect();
        Stored::Response {
            status: parts.status.as_u16(),
            headers,
            body: serde_bytes::ByteBuf::from(body.to_vec()),
        }
    }

    /// The response a retry gets.
    pub(crate) fn replay(self) -> Response<IdemBody> {
        match self {
            Stored::Response {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(IdemBody::from(Bytes::from(body.into_vec())));
                *response.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let map: &mut HeaderMap = response.headers_mut();
                for (name, value) in headers {
                    // Written by this layer from a valid header: a record that does not parse
                    // back was not written by it, and its header is left out.
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_bytes(&value),
                    ) {
                        map.append(name, value);
                    }
                }
                map.insert(REPLAYED, HeaderValue::from_static("true"));
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
