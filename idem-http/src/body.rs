//! The layer's response body: a buffered one (stored or replayed responses), or one passed
//! through from the inner service, possibly after the part the layer already read.

use crate::relay::Queue;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use idem_runtime::BoxError;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The body of the responses [`Idempotency`](crate::Idempotency) returns.
///
/// ```
/// use http_body::Body;
/// let body = idem_http::IdemBody::from(bytes::Bytes::from_static(b"paid"));
/// assert_eq!(body.size_hint().exact(), Some(4));
/// ```
pub struct IdemBody(Inner);

enum Inner {
    Full(Option<Bytes>, Option<HeaderMap>),
    Stream {
        head: Option<Bytes>,
        rest: UnsyncBoxBody<Bytes, BoxError>,
    },
    /// The route's body as the layer reads it to store it, frame by frame.
    Relayed {
        frames: Queue,
        hint: SizeHint,
    },
}

impl IdemBody {
    /// The inner service's body, untouched.
    pub(crate) fn pass<B>(body: B) -> IdemBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        IdemBody::resume(None, body)
    }

    /// `head` (what the layer read of `rest` already), then the rest of the inner body.
    pub(crate) fn resume<B>(head: Option<Bytes>, rest: B) -> IdemBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        IdemBody(Inner::Stream {
            head: head.filter(|h| !h.is_empty()),
            rest: rest.map_err(Into::into).boxed_unsync(),
        })
    }
}

impl IdemBody {
    /// A stored body and its trailers.
    pub(crate) fn stored(bytes: Bytes, trailers: Option<HeaderMap>) -> IdemBody {
        IdemBody(Inner::Full(Some(bytes), trailers))
    }

    /// The frames sent on `frames`; `hint` is the route's body's own (so a known length is
    /// still sent as `Content-Length`).
    pub(crate) fn relayed(frames: Queue, hint: SizeHint) -> IdemBody {
        IdemBody(Inner::Relayed { frames, hint })
    }
}

impl From<Bytes> for IdemBody {
    fn from(bytes: Bytes) -> IdemBody {
        IdemBody::stored(bytes, None)
    }
}

impl Body for IdemBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Full(bytes, trailers) => match bytes.take().filter(|b| !b.is_empty()) {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            Inner::Relayed { frames, .. } => frames.poll_frame(cx),
            Inner::Stream { head, rest } => match head.take() {
                Some(head) => Poll::Ready(Some(Ok(Frame::data(head)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes, trailers) => {
                bytes.as_ref().is_none_or(|b| b.is_empty()) && trailers.is_none()
            }
            Inner::Relayed { .. } => false,
            Inner::Stream { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            // With trailers, no exact size: HTTP/1.1 sends trailers only with a chunked body.
            Inner::Full(bytes, Some(_)) => {
                let mut hint = SizeHint::new();
                hint.set_lower(bytes.as_ref().map_or(0, |b| b.len() as u64));
                hint
            }
            Inner::Full(bytes, None) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Relayed { hint, .. } => *hint,
            Inner::Stream { head, rest } => {
                let head = head.as_ref().map_or(0, |h| h.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + head);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
        }
    }
}
