//! The service the layer wraps around a route: read the key and the body, then run the route
//! through idem's lock-check-execute-mark on a task of its own.

use crate::body::IdemBody;
use crate::fingerprint;
use crate::layer::Config;
use crate::problem::Problem;
use crate::stored::Stored;
use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use idem_runtime::{BoxError, Call, Error, Key, KeyBuilder};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tower_service::Service;
use tracing::Instrument;

/// The service [`IdempotencyLayer`](crate::IdempotencyLayer) wraps around `S`.
///
/// `S` takes requests whose body can be rebuilt from bytes (`From<Bytes>`: axum's `Body` and
/// `http_body_util::Full` can), since the layer reads the body to fingerprint it.
///
/// ```
/// use idem_http::IdempotencyLayer;
/// use idem_runtime::MemoryStore;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let svc = IdempotencyLayer::new(MemoryStore::new(), "plain-tower").layer(service_fn(
///     |_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
///             bytes::Bytes::from_static(b"done"),
///         )))
///     },
/// ));
/// let req = || {
///     http::Request::post("/jobs")
///         .header("idempotency-key", "k-1")
///         .body(http_body_util::Full::default())
///         .unwrap()
/// };
/// let first = svc.clone().oneshot(req()).await.unwrap();
/// assert!(first.headers().get(idem_http::REPLAYED).is_none());
/// let again = svc.oneshot(req()).await.unwrap();
/// assert_eq!(again.headers()[idem_http::REPLAYED], "true");
/// # });
/// ```
pub struct Idempotency<S> {
    pub(crate) inner: S,
    pub(crate) cfg: Arc<Config>,
}

impl<S: Clone> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<IdemBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<IdemBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The service that was polled ready is the one called; a clone stays for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.cfg.clone(), inner, req))
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

async fn handle<S, ReqB, ResB>(
    cfg: Arc<Config>,
    mut inner: S,
    req: Request<ReqB>,
) -> Result<Response<IdemBody>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    if is_safe(req.method()) {
        return pass(inner.call(req).await);
    }
    let (parts, body) = req.into_parts();
    let key = match key_of(&cfg, &parts) {
        Ok(Some(key)) => key,
        Ok(None) if !cfg.required => {
            return pass(inner.call(Request::from_parts(parts, body)).await);
        }
        Ok(None) => return Ok(Problem::MissingKey.response(None)),
        Err(problem) => return Ok(problem.response(None)),
    };
    // Read whole (it is fingerprinted), within the limit; nothing is claimed yet, so a client
    // that goes away now leaves nothing behind.
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_request_body as u64) {
        return Ok(Problem::RequestTooLarge(cfg.max_request_body).response(None));
    }
    let bytes = match Limited::new(body, cfg.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(Problem::RequestTooLarge(cfg.max_request_body).response(None));
        }
        Err(_) => return Ok(Problem::UnreadableRequest.response(None)),
    };
    let call = Call::from_key(Ok(key)).fingerprint(fingerprint::of(&cfg, &parts, &bytes));
    // A task of its own: a client that disconnects drops this future, not the handler it
    // started, whose response is then stored for the client's retry. The first of: the
    // route's response head (this request runs it; its body follows as the route gives it, read
    // and stored by the task), or the task's end (a replay, a refusal, a response not stored).
    let (head_tx, head_rx) = oneshot::channel();
    let task = tokio::spawn(
        execute(cfg, inner, parts, bytes, call, head_tx).instrument(tracing::Span::current()),
    );
    if let Ok(response) = head_rx.await {
        return Ok(response);
    }
    match task.await {
        Ok(answer) => answer,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Ok(Problem::Unavailable.response(Some(Duration::from_secs(1)))),
    }
}

/// The key of a request: `Ok(None)` without the header, `Err` with a malformed one.
fn key_of(cfg: &Config, parts: &Parts) -> Result<Option<Key>, Problem> {
    let Some(text) = header_key(&parts.headers, &cfg.header)? else {
        return Ok(None);
    };
    let mut key = KeyBuilder::new("");
    if let Some(caller) = &cfg.caller {
        // A request the application names no caller for shares no one's keys: refused, never
        // put in a key space of "nobody" that every unidentified request would share.
        let who = caller(parts).ok_or(Problem::UnidentifiedCaller)?;
        // The caller and the key as two escaped parts: no caller can spell another's key.
        key.part(who.as_str());
    }
    key.part(text.as_str())
        .finish()
        .map(Some)
        .map_err(|e| Problem::of(&e))
}

/// The key in header `name`: `None` without one; an error if it is malformed or sent twice.
pub(crate) fn header_key(
    headers: &http::HeaderMap,
    name: &http::HeaderName,
) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::InvalidKey("the header was sent more than once"));
    }
    key_text(value).map(Some)
}

/// The key a client sent in `value`, checked: 1 to 255 visible ASCII characters, bare or in the
/// IETF draft's quoted form.
fn key_text(value: &http::HeaderValue) -> Result<String, Problem> {
    let text = value
        .to_str()
        .map_err(|_| Problem::InvalidKey("it must be visible ASCII characters"))?
        .trim();
    if text.is_empty() {
        return Err(Problem::InvalidKey("it is empty"));
    }
    if text.len() > crate::IdempotencyLayer::MAX_KEY_LEN {
        return Err(Problem::InvalidKey("it is longer than 255 characters"));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::InvalidKey(
            "it must be visible ASCII characters, without spaces",
        ));
    }
    let text = unquote(text)?;
    if text.is_empty() {
        return Err(Problem::InvalidKey("it is empty"));
    }
    Ok(text.into_owned())
}

/// The IETF draft's form of a key is a structured-field string (`"..."`, with `\"` and `\\`
/// escaped); Stripe's is the bare value.
fn unquote(text: &str) -> Result<std::borrow::Cow<'_, str>, Problem> {
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return Ok(text.into());
    };
    if !inner.contains('\\') {
        return Ok(inner.into());
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return Err(Problem::InvalidKey("a quoted key has an invalid escape")),
            },
            '"' => return Err(Problem::InvalidKey("a quoted key has an unescaped quote")),
            c => out.push(c),
        }
    }
    Ok(out.into())
}

/// Why the route's response is not stored (idem releases the key on `Err`).
enum Fail<E> {
    Idem(Error),
    /// A response that is not stored (a 5xx, or a 4xx not chosen for storing): passed through.
    Pass(Response<IdemBody>),
    /// The inner service failed.
    Inner(E),
}

impl<E> From<Error> for Fail<E> {
    fn from(e: Error) -> Self {
        Fail::Idem(e)
    }
}

async fn execute<S, ReqB, ResB>(
    cfg: Arc<Config>,
    mut inner: S,
    parts: Parts,
    bytes: Bytes,
    call: Call,
    head_tx: oneshot::Sender<Response<IdemBody>>,
) -> Result<Response<IdemBody>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: From<Bytes>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // What the client of this request gets of the route's response: all of it as the route
    // gives it, except what completes it (its last frame, or the end of a body of unknown
    // length), held back until the key is marked done, so that a client cannot hold the whole
    // response (and retry) before a retry would be answered with it.
    let mut relay = Relay::default();
    let out: Result<Stored, Fail<S::Error>> =
        idem_runtime::run(&*cfg.store, &cfg.opts, call, || async {
            let req = Request::from_parts(parts, ReqB::from(bytes));
            let response = inner.call(req).await.map_err(Fail::Inner)?;
            let (head, body) = response.into_parts();
            if !cfg.stores(head.status) {
                return Err(Fail::Pass(Response::from_parts(head, IdemBody::pass(body))));
            }
            // From here on the route has run: whatever its body does, the key completes, so
            // that a retry never runs it again.
            let (frames_tx, frames_rx) = mpsc::channel(8);
            let stored = Stored::head(&head);
            let hint = body.size_hint();
            let head = Item::Head(
                head_tx,
                Response::from_parts(head, IdemBody::relayed(frames_rx, hint)),
            );
            relay.frames = Some(frames_tx);
            // A response with no body is whole with its head: held back.
            relay
                .pass(head, body.is_end_stream() || hint.exact() == Some(0))
                .await;
            Ok(read_body(body, &mut relay, cfg.max_response_body, stored).await)
        })
        .await;
    let relayed = relay.finish().await;
    match out {
        // A replay (`relayed` is false), or the end of the body this call relayed (the client
        // has its response already: what is returned here goes nowhere).
        Ok(stored) => Ok(stored.replay()),
        Err(Fail::Pass(response)) => Ok(response),
        Err(Fail::Inner(e)) => Err(e),
        Err(Fail::Idem(e)) => {
            if relayed {
                // The route ran and its client has its response, but the key could not be
                // marked done (the store went away, or the lease was lost).
                tracing::warn!(error = %e, "the response could not be stored; a retry may run the route again");
            } else if matches!(Problem::of(&e), Problem::Internal) {
                tracing::error!(error = %e, "idempotent request failed");
            }
            let retry_after = match &e {
                Error::InFlight { retry_after, .. } => Some(cfg.retry_after.min(*retry_after)),
                Error::Unavailable { .. } | Error::NoStore => Some(cfg.retry_after),
                _ => None,
            };
            let mut response = Problem::of(&e).response(retry_after);
            if matches!(e, Error::Unreplayable { .. }) {
                response
                    .headers_mut()
                    .insert(crate::REPLAYED, http::HeaderValue::from_static("true"));
            }
            Ok(response)
        }
    }
}

/// Read the route's body to the end: each frame goes on to the client (through `relay`), and
/// into the record within `limit`. What is stored: `head` with the body and its trailers, or,
/// past the limit or after the body failed or panicked, a record saying the response was not
/// kept (the route ran all the same).
async fn read_body<B>(body: B, relay: &mut Relay, limit: usize, head: Stored) -> Stored
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
struct Relay {
    /// The response's head, until its first frame goes.
    head: Option<Item>,
    /// What completes the response, held back until the key is settled.
    held: Option<Item>,
    /// The body's frames; `None` once the client went away (the body is still read and stored).
    frames: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
    /// The route answered with a response that is stored (its head was passed on).
    answered: bool,
}

enum Item {
    Head(oneshot::Sender<Response<IdemBody>>, Response<IdemBody>),
    Frame(Result<Frame<Bytes>, BoxError>),
}

impl Relay {
    /// Send `item` on, or hold it back: the head until the first frame goes (so that a
    /// response whose one frame completes it goes out whole, in one write, after the mark, not
    /// its head first and its body a round trip later), and what completes the response until
    /// the key is settled.
    async fn pass(&mut self, item: Item, completes: bool) {
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
    async fn finish(mut self) -> bool {
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

/// A response passed through, untouched.
fn pass<B, E>(r: Result<Response<B>, E>) -> Result<Response<IdemBody>, E>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    r.map(|response| response.map(IdemBody::pass))
}
