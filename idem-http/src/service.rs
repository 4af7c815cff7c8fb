//! The service the layer wraps around a route: read the key and the body, then run the route
//! through idem's lock-check-execute-mark on a task of its own.

use crate::IdempotencyLayer;
use crate::body::IdemBody;
use crate::fingerprint;
use crate::layer::Config;
use crate::problem::Problem;
use crate::relay::{Relay, guarded, read_body};
use crate::stored::Stored;
use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use idem_runtime::{BoxError, Call, Error, Key, KeyBuilder};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
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
    // The route's response on its way to this request's client (`relay.rs`).
    let mut relay = Relay::none();
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
            let stored = Stored::head(&head);
            let length = head
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let hint = guarded(|| body.size_hint()).unwrap_or_default();
            // The client may fall behind by a whole stored response before it is cut off.
            let budget = cfg
                .max_response_body
                .max(IdempotencyLayer::DEFAULT_MAX_BODY);
            relay = Relay::new(head_tx, head, hint, budget);
            Ok(read_body(body, &mut relay, cfg.max_response_body, stored, length).await)
        })
        .await;
    let relayed = relay.finish();
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

/// A response passed through, untouched.
fn pass<B, E>(r: Result<Response<B>, E>) -> Result<Response<IdemBody>, E>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    r.map(|response| response.map(IdemBody::pass))
}
