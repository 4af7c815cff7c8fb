//! The route's response on its way to its client while it is read and stored.
//!
//! The store never waits on the client: frames go to the client through an unbounded queue,
//! whose unread bytes are bounded by a budget (a client that falls further behind is cut off,
//! and its retry gets the stored response). What completes the response (the frame that ends
//! it, a known length reached, the end of a stream) is held back until the key is marked, so a
//! client cannot hold the whole response, and retry, before a retry is answered with it.

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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};

/// The route's response on its way to this request's client.
pub(crate) struct Relay {
    /// The response's head, until its first frame goes.
    head: Option<(oneshot::Sender<Response<IdemBody>>, Response<IdemBody>)>,
    /// What completes the response, and everything after it, held back until the key is settled.
    held: Vec<Result<Frame<Bytes>, BoxError>>,
    /// The body's frames; `None` once the client went away or was cut off (the body is still
    /// read and stored).
    frames: Option<mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>>,
    /// Bytes sent to the client and not read by it yet, and how many may be.
    queued: Arc<AtomicUsize>,
    budget: usize,
    /// The route answered with a response that is stored (its head was given to the relay).
    answered: bool,
}

/// The frames of a relayed body, as its client reads them.
pub(crate) struct Queue {
    frames: mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>,
    queued: Arc<AtomicUsize>,
}

impl Queue {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.frames.poll_recv(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.queued.fetch_sub(data.len(), Ordering::Relaxed);
        }
        polled
    }
}

impl Relay {
    /// A relay for a response of head `head` (its body still to come), to `to`; at most
    /// `budget` bytes wait for the client.
    pub(crate) fn new(
        to: oneshot::Sender<Response<IdemBody>>,
        head: http::response::Parts,
        hint: http_body::SizeHint,
        budget: usize,
    ) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            frames: rx,
            queued: queued.clone(),
        };
        let response = Response::from_parts(head, IdemBody::relayed(queue, hint));
        Relay {
            head: Some((to, response)),
            held: Vec::new(),
            frames: Some(tx),
            queued,
            budget,
            answered: true,
        }
    }

    /// No response of the route's is relayed (a replay, a refusal, a response not stored).
    pub(crate) fn none() -> Relay {
        Relay {
            head: None,
            held: Vec::new(),
            frames: None,
            queued: Arc::new(AtomicUsize::new(0)),
            budget: 0,
            answered: false,
        }
    }

    /// Send the head now (the body has nothing ready yet), unless something is held back.
    fn head_now(&mut self) {
        if self.held.is_empty()
            && let Some((to, head)) = self.head.take()
        {
            let _ = to.send(head);
        }
    }

    /// Pass `frame` on, or hold it back if it `completes` the response (or comes after one
    /// that did).
    fn pass(&mut self, frame: Result<Frame<Bytes>, BoxError>, completes: bool) {
        if completes || !self.held.is_empty() {
            self.held.push(frame);
            return;
        }
        self.head_now();
        self.send(frame);
    }

    fn send(&mut self, frame: Result<Frame<Bytes>, BoxError>) {
        let Some(frames) = &self.frames else {
            return;
        };
        let len = frame
            .as_ref()
            .ok()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len());
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.budget {
            // A client this far behind is not waited for: it is cut off (its body breaks
            // off, never ends as if whole), and its retry gets the stored response.
            tracing::info!("the client fell behind its response; cut off");
            let _ = frames.send(Err("the client fell behind".into()));
            self.frames = None;
            return;
        }
        if frames.send(frame).is_err() {
            self.frames = None;
        }
    }

    /// The key is settled: send the head and what was held back, and end the body. Whether
    /// the route's response went (or goes now) to this request's client.
    pub(crate) fn finish(mut self) -> bool {
        if let Some((to, head)) = self.head.take() {
            let _ = to.send(head);
        }
        for frame in std::mem::take(&mut self.held) {
            // Held frames were counted by none: the client has its response now.
            if let Some(frames) = &self.frames {
                let _ = frames.send(frame);
            }
        }
        self.answered
    }
}

/// Read the route's body to the end: each frame goes on to the client (through `relay`), and
/// into the record within `limit`. What is stored: `head` with the body and its trailers, or,
/// past the limit or after the body failed or panicked, a record saying the response was not
/// kept (the route ran all the same).
/// `length` is the response's `Content-Length` header, if it has one.
pub(crate) async fn read_body<B>(
    body: B,
    relay: &mut Relay,
    limit: usize,
    head: Stored,
    length: Option<u64>,
) -> Stored
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The length its client counts on: the header the route set, else the body's own.
    let Some(exact) = guarded(|| length.or(body.size_hint().exact())) else {
        drop_guarded(body);
        return head.not_stored(false);
    };
    let mut body = body.map_err(Into::into).boxed_unsync();
    let mut read = Some(BytesMut::new());
    let mut trailers = None;
    let mut seen: u64 = 0;
    // The head goes out with the first frame if that is ready at once (one write, not the head
    // and then the body a round trip later), else at once.
    let mut ready = std::future::poll_fn(|cx| Poll::Ready(poll_next(&mut body, cx))).await;
    if ready.is_pending() && exact != Some(0) {
        relay.head_now();
    }
    let stored = loop {
        let next = match std::mem::replace(&mut ready, Poll::Pending) {
            Poll::Ready(next) => next,
            Poll::Pending => std::future::poll_fn(|cx| poll_next(&mut body, cx)).await,
        };
        let frame = match next {
            Next::Frame(frame) => frame,
            Next::End => {
                break match read.take() {
                    Some(read) => head.with_body(read.freeze(), trailers),
                    None => head.not_stored(true),
                };
            }
            Next::Failed(e) => {
                tracing::error!(error = %e, "the response body failed after the route ran; a retry gets 410");
                relay.pass(Err(e), false);
                break head.not_stored(false);
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
        let ends = guarded(|| body.is_end_stream()).unwrap_or(true);
        relay.pass(Ok(frame), ends || exact.is_some_and(|n| seen >= n));
    };
    drop_guarded(body);
    stored
}

enum Next {
    Frame(Frame<Bytes>),
    End,
    Failed(BoxError),
}

/// The body's next frame; a body that panics counts as one that failed (the panic is not let
/// through idem's call, which would release the key of a route that ran).
fn poll_next(body: &mut UnsyncBoxBody<Bytes, BoxError>, cx: &mut Context<'_>) -> Poll<Next> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *body).poll_frame(cx))) {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(None)) => Poll::Ready(Next::End),
        Ok(Poll::Ready(Some(Ok(frame)))) => Poll::Ready(Next::Frame(frame)),
        Ok(Poll::Ready(Some(Err(e)))) => Poll::Ready(Next::Failed(e)),
        Err(_) => Poll::Ready(Next::Failed("the response body panicked".into())),
    }
}

/// `f`, or `None` if it panicked: the route's body is the application's code, run inside
/// idem's call, where a panic would release the key of a route that ran.
pub(crate) fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

fn drop_guarded<T>(value: T) {
    if guarded(move || drop(value)).is_none() {
        tracing::error!("the response body panicked when dropped");
    }
}
