//! The route's response on its way to its client while it is read and stored.

use crate::body::IdemBody;
use crate::stored::Stored;
use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use idem_runtime::BoxError;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};

/// Read the route's body to the end: each frame goes on to the client (through `relay`), and
/// into the record within `limit`. What is stored: `head` with the body and its trailers, or,
/// past the limit or after the body failed or panicked, a record saying the response was not
/// kept (the route ran all the same).
pub(crate) async fn read_body<B>(body: B, relay: &mut Relay, limit: usize, head: Stored) -> Stored
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let exact = body.size_hint().exact();
    let mut body = body.map_err(Into::into).boxed_unsync();
    let mut read = Some(BytesMut::new());
    let mut trailers = None;
    let mut seen: u64 = 0;
    loop {
        let frame = match next_frame(&mut body).await {
            Next::Frame(frame) => frame,
            Next::End => break,
            Next::Failed(e) => {
                tracing::error!(error = %e, "the response body failed after the route ran; a retry gets 410");
                relay.pass(Item::Frame(Err(e)), false).await;
                return head.not_stored(false);
            }
        };
        if let Some(data) = frame.data_ref() {
            seen += data.len() as u64;
            if read.as_ref().is_some_and(|r| r.len() + data.len() > limit) {
                read = None;
            }
            if let Some(read) = &mut read {
                read.extend_from_slice(data);
            }
        } else if let Some(t) = frame.trailers_ref() {
            trailers = Some(t.clone());
        }
        // The frame that completes the response: the body says it ends, or a known length is
        // reached (its client would hold the whole response without waiting for the end).
        let last = body.is_end_stream() || exact.is_some_and(|n| seen >= n);
        relay.pass(Item::Frame(Ok(frame)), last).await;
    }
    match read {
        Some(read) => head.with_body(read.freeze(), trailers),
        None => head.not_stored(true),
    }
}

/// The route's response on its way to this request's client.
#[derive(Default)]
pub(crate) struct Relay {
    /// The response's head, until its first frame goes.
    head: Option<Item>,
    /// What completes the response, held back until the key is settled.
    held: Option<Item>,
    /// The body's frames; `None` once the client went away (the body is still read and stored).
    pub(crate) frames: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
    /// The route answered with a response that is stored (its head was passed on).
    answered: bool,
}

pub(crate) enum Item {
    Head(oneshot::Sender<Response<IdemBody>>, Response<IdemBody>),
    Frame(Result<Frame<Bytes>, BoxError>),
}

impl Relay {
    /// Send `item` on, or hold it back: the head until the first frame goes (so that a
    /// response whose one frame completes it goes out whole, in one write, after the mark, not
    /// its head first and its body a round trip later), and what completes the response until
    /// the key is settled.
    pub(crate) async fn pass(&mut self, item: Item, completes: bool) {
        if matches!(item, Item::Head(..)) {
            self.answered = true;
            self.head = Some(item);
            return;
        }
        if let Some(held) = self.held.take() {
            self.send(held).await;
        }
        if completes {
            self.held = Some(item);
        } else {
            if let Some(head) = self.head.take() {
                self.send(head).await;
            }
            self.send(item).await;
        }
    }

    async fn send(&mut self, item: Item) {
        match item {
            Item::Head(to, head) => {
                let _ = to.send(head);
            }
            Item::Frame(frame) => {
                if let Some(frames) = &self.frames
                    && frames.send(frame).await.is_err()
                {
                    self.frames = None;
                }
            }
        }
    }

    /// The key is settled: send what was held back, and end the body. Whether the route's
    /// response went (or goes now) to this request's client.
    pub(crate) async fn finish(mut self) -> bool {
        for item in [self.head.take(), self.held.take()].into_iter().flatten() {
            self.send(item).await;
        }
        self.answered
    }
}

enum Next {
    Frame(Frame<Bytes>),
    End,
    Failed(BoxError),
}

/// The body's next frame; a body that panics counts as one that failed (the panic is not let
/// through idem's call, which would release the key of a route that ran).
async fn next_frame(body: &mut UnsyncBoxBody<Bytes, BoxError>) -> Next {
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *body).poll_frame(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(None)) => Poll::Ready(Next::End),
            Ok(Poll::Ready(Some(Ok(frame)))) => Poll::Ready(Next::Frame(frame)),
            Ok(Poll::Ready(Some(Err(e)))) => Poll::Ready(Next::Failed(e)),
            Err(_) => Poll::Ready(Next::Failed("the response body panicked".into())),
        }
    })
    .await
}
