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
use http_body_util::{BodyExt, LengthLimitError, Limited};
use idem_runtime::{BoxError, Call, Error, Key, KeyBuilder};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower_service::Service;

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
    // started, whose response is then stored for the client's retry.
    let task = tokio::spawn(execute(cfg, inner, parts, bytes, call));
    match task.await {
        Ok(answer) => answer,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Ok(Problem::Unavailable.response(None)),
    }
}

/// The key of a request: `Ok(None)` without the header, `Err` with a malformed one.
fn key_of(cfg: &Config, parts: &Parts) -> Result<Option<Key>, Problem> {
    let mut values = parts.headers.get_all(&cfg.header).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Problem::InvalidKey("the header was sent more than once"));
    }
    let text = value
        .to_str()
        .map_err(|_| Problem::InvalidKey("it must be visible ASCII characters"))?
        .trim();
    // The IETF draft's form is a structured-field string ("..."); Stripe's is the bare value.
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
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
    let caller = cfg.caller.as_ref().and_then(|caller| caller(parts));
    // The caller and the key as two escaped parts: no caller can spell another caller's key.
    KeyBuilder::new("")
        .part(caller.as_deref().unwrap_or(""))
        .part(text)
        .finish()
        .map(Some)
        .map_err(|e| Problem::of(&e))
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
) -> Result<Response<IdemBody>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: From<Bytes>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // The response of the run this call made, for its own client (a replay is rebuilt from the
    // store instead).
    let first: Mutex<Option<Response<IdemBody>>> = Mutex::new(None);
    let limit = cfg.max_response_body;
    let out: Result<Stored, Fail<S::Error>> =
        idem_runtime::run(&*cfg.store, &cfg.opts, call, || async {
            let req = Request::from_parts(parts, ReqB::from(bytes));
            let response = inner.call(req).await.map_err(Fail::Inner)?;
            let (head, body) = response.into_parts();
            if !cfg.stores(head.status) {
                return Err(Fail::Pass(Response::from_parts(head, IdemBody::pass(body))));
            }
            let mut body = body.map_err(Into::into).boxed_unsync();
            let mut read = BytesMut::new();
            loop {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => {
                        // Trailers are not stored.
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        if read.len() + data.len() > limit {
                            // The route ran: its key completes, so it never runs twice; its
                            // client gets the response whole, a retry a 410.
                            read.extend_from_slice(&data);
                            let status = head.status.as_u16();
                            let whole = IdemBody::resume(Some(read.freeze()), body);
                            *first.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(Response::from_parts(head, whole));
                            return Ok(Stored::NotStored {
                                status,
                                too_large: true,
                            });
                        }
                        read.extend_from_slice(&data);
                    }
                    Some(Err(e)) => {
                        // The route ran, but what it answered cannot be known whole.
                        tracing::error!(error = %e, "the response body failed while it was read to be stored; a retry gets 410");
                        *first.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Problem::Internal.response(None));
                        return Ok(Stored::NotStored {
                            status: head.status.as_u16(),
                            too_large: false,
                        });
                    }
                }
            }
            let read = read.freeze();
            let stored = Stored::of(&head, &read);
            *first.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Response::from_parts(head, IdemBody::from(read)));
            Ok(stored)
        })
        .await;
    let first = first.into_inner().unwrap_or_else(|p| p.into_inner());
    match (out, first) {
        // This call ran the route: its client gets the response as the route gave it.
        (Ok(_), Some(response)) => Ok(response),
        (Ok(stored), None) => Ok(stored.replay()),
        (Err(Fail::Pass(response)), _) => Ok(response),
        (Err(Fail::Inner(e)), _) => Err(e),
        (Err(Fail::Idem(e)), Some(response)) => {
            // The route ran and answered, but its key could not be marked done (the store went
            // away, or the lease was lost): its client still gets what the route did.
            tracing::warn!(error = %e, "the response could not be stored; a retry may run the route again");
            Ok(response)
        }
        (Err(Fail::Idem(e)), None) => {
            let retry_after = match &e {
                Error::InFlight { retry_after, .. } => Some(cfg.retry_after.min(*retry_after)),
                Error::Unavailable { .. } | Error::NoStore => Some(cfg.retry_after),
                _ => None,
            };
            if matches!(Problem::of(&e), Problem::Internal) {
                tracing::error!(error = %e, "idempotent request failed");
            }
            Ok(Problem::of(&e).response(retry_after))
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
