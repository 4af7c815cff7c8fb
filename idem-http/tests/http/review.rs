//! An outside review's findings on the first version of the layer: each test failed on it, is
//! named after what broke, and its doc comment says what was wrong and why it matters. Real
//! server, real client, real stores.

use crate::support::*;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body::Frame;
use idem_http::IdempotencyLayer;
use idem_runtime::MemoryStore;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Counts runs and answers 201 with the request body it got, byte for byte: a response that
/// belongs to one payload.
async fn echo(State(runs): State<Arc<AtomicU32>>, body: Bytes) -> Response {
    runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, body).into_response()
}

fn echo_app(layer: IdempotencyLayer) -> (Router, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route("/payments", post(echo))
        .layer(layer)
        .with_state(runs.clone());
    (router, runs)
}

/// Two payments whose JSON amounts differ, but not as `f64`s (integers past 2^64, decimals past
/// 17 significant digits), have one fingerprint: `serde_json::Value` without
/// `arbitrary_precision` rounds them to the same float. The second request, another payment
/// under a reused key, is answered with the first payment's response (201, replayed) instead of
/// 422, so its client believes a payment of an amount that never ran was made. A money API is
/// exactly where amounts are decimal strings of more than 17 digits (or an exact decimal type
/// parses them). High: another request's response to a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_that_differ_past_f64_precision_get_the_other_payments_response() {
    let client = reqwest::Client::new();
    let mut wrong = Vec::new();
    for t in targets().await {
        let (router, runs) = echo_app(IdempotencyLayer::new(t.store.clone(), "review.f64"));
        let (addr, _server) = serve(router).await;
        let send = |key: &'static str, body: &'static str| {
            client
                .post(format!("http://{addr}/payments"))
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body)
                .send()
        };
        let pairs = [
            (
                "big-int",
                r#"{"amount":100000000000000000001}"#,
                r#"{"amount":100000000000000000000}"#,
            ),
            (
                "decimal",
                r#"{"amount":0.10000000000000001}"#,
                r#"{"amount":0.1}"#,
            ),
        ];
        for (key, first_body, other_body) in pairs {
            let first = seen(send(key, first_body).await.unwrap()).await;
            assert_eq!(first.status, 201, "{}", t.name);
            let other = seen(send(key, other_body).await.unwrap()).await;
            if other.status != 422 || other.replayed {
                wrong.push(format!(
                    "{}: {key}: another amount under a reused key got {} (replayed: {}) with \
                     the first payment's body {:?}, not 422",
                    t.name,
                    other.status,
                    other.replayed,
                    String::from_utf8_lossy(&other.body)
                ));
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2, "{}", t.name);
        t.cleanup().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The layer fingerprints `parts.uri`, which is what it sees: under `Router::nest` that is the
/// path with the nested prefix stripped, captures included. A layer on the inner router of
/// `nest("/accounts/{id}", ...)` sees `/transfers` for every account, so the same key sent for
/// account 2 after account 1 is answered with account 1's transfer (201, replayed) instead of
/// 422; account 2's transfer never runs and its client is told it did. The docs promise that
/// the path is part of the payload. Medium-high: another request's response to a client, for a
/// common way of mounting routes (per-resource routers, `/v1` nests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_inside_a_nested_router_replays_another_accounts_transfer() {
    async fn transfer(State(runs): State<Arc<AtomicU32>>, Path(id): Path<String>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        (
            StatusCode::CREATED,
            format!("transferred from account {id}"),
        )
            .into_response()
    }
    let runs = Arc::new(AtomicU32::new(0));
    let accounts = Router::new()
        .route("/transfers", post(transfer))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review.nest"))
        .with_state(runs.clone());
    let (addr, _server) = serve(Router::new().nest("/accounts/{id}", accounts)).await;
    let client = reqwest::Client::new();
    let send = |account: u32| {
        client
            .post(format!("http://{addr}/accounts/{account}/transfers"))
            .header("content-type", "application/json")
            .header("idempotency-key", "t-1")
            .body(r#"{"amount":10}"#)
            .send()
    };
    let one = seen(send(1).await.unwrap()).await;
    assert_eq!(one.body, b"transferred from account 1");
    let two = seen(send(2).await.unwrap()).await;
    assert!(
        two.status == 422 && !two.replayed,
        "account 2 got {} (replayed: {}): {:?}, not 422",
        two.status,
        two.replayed,
        String::from_utf8_lossy(&two.body)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A response within `max_response_body` (the default, 1 MiB) is promised to be stored and
/// replayed, but the layer leaves idem's `max_output` at its own default of 1 MiB too, and the
/// stored record (status, headers, body) is larger than the body: a body a little under the
/// limit becomes an unreplayable record, and the retry of a completed request gets 410 instead
/// of its response. Medium: a client that lost the first response cannot get it although the
/// docs say it is kept (`new` should set `max_output` as `max_response_body` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_just_under_the_default_limit_is_replayed_not_410() {
    const SIZE: usize = IdempotencyLayer::DEFAULT_MAX_BODY - 64;
    async fn report(State(runs): State<Arc<AtomicU32>>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        (StatusCode::OK, "x".repeat(SIZE)).into_response()
    }
    let runs = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route("/payments", post(report))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review.size"))
        .with_state(runs.clone());
    let (addr, _server) = serve(router).await;
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "report-1")
            .body("{}")
            .send()
    };
    let first = seen(send().await.unwrap()).await;
    assert_eq!((first.status, first.body.len()), (200, SIZE));
    let retry = seen(send().await.unwrap()).await;
    assert_eq!(
        (retry.status, retry.replayed, retry.body.len()),
        (200, true, SIZE),
        "a {SIZE}-byte response (under the {} limit) was not replayed: {}",
        IdempotencyLayer::DEFAULT_MAX_BODY,
        String::from_utf8_lossy(&retry.body[..retry.body.len().min(300)])
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A streaming response (server-sent events, a streamed LLM completion, a long export) is
/// buffered whole before its client sees a byte: the layer reads the body to store it before
/// it answers, so the first client gets the status line only when the stream ends (or passes
/// `max_response_body`). A stream that is meant to be watched live is not, and a client with a
/// read timeout gives up, retries, and gets 409 while the first stream runs. Worse (not
/// exercised here: it takes an hour): the route's effect happened when it returned its head,
/// but its key stays in flight while the body streams, so a stream under the limit that lasts
/// past idem's `max_lease` (1 h, not settable on the layer) loses its lease and a retry runs
/// the route again. Medium: the first response should be teed (sent as it is read, stored on
/// the side), or the key completed once the head is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_reaches_its_client_before_it_ends() {
    let (tx, handler) = event_stream();
    let router = Router::new()
        .route("/payments", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review.stream"));
    let (addr, _server) = serve(router).await;
    tx.send(Ok(Bytes::from_static(b"data: started\n\n")))
        .unwrap();
    let response = tokio::time::timeout(
        Duration::from_secs(3),
        reqwest::Client::new()
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "stream-1")
            .body("{}")
            .send(),
    )
    .await;
    let outcome = match response {
        Err(_) => None,
        Ok(r) => Some(r.unwrap().status()),
    };
    // End the stream, so nothing is left running.
    tx.send(Ok(Bytes::from_static(b"data: done\n\n"))).unwrap();
    drop(tx);
    assert!(
        outcome.is_some(),
        "a streaming response's client saw nothing in 3 s although its first event was sent"
    );
}

/// The caller function's `None` (the anonymous caller) and `Some("")` (a caller named by an
/// empty value, e.g. an empty `X-Account` header or an empty `sub` claim) are written as the
/// same empty key part, so they share one key space: a request with an empty account gets
/// the anonymous caller's response (and the other way round). Low: it needs a caller function
/// that can return an empty name; the fix is to tag the two (`part("-")` / `part("+" + name)`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_caller_name_shares_the_anonymous_callers_keys() {
    let layer = IdempotencyLayer::new(MemoryStore::new(), "review.caller").caller(|req| {
        req.headers
            .get("x-account")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let (router, runs) = echo_app(layer);
    let (addr, _server) = serve(router).await;
    let client = reqwest::Client::new();
    let anonymous = seen(
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "c-1")
            .body("anonymous's payment")
            .send()
            .await
            .unwrap(),
    )
    .await;
    anonymous.assert_problem(401, "unidentified-caller", &["c-1"]);
    let empty = |body: &'static str| {
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "c-1")
            .header("x-account", "")
            .body(body)
            .send()
    };
    assert_eq!(
        empty("the empty caller's payment").await.unwrap().status(),
        201
    );
    let again = seen(empty("the empty caller's payment").await.unwrap()).await;
    assert!(again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A response body made of the given frames, in order; `None` panics when it is reached (a
/// lazily rendered body whose renderer panics).
struct Frames(std::collections::VecDeque<Option<Frame<Bytes>>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.0.pop_front() {
            None => Poll::Ready(None),
            Some(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(None) => panic!("the body's renderer panicked"),
        }
    }
}

/// The route ran and returned `201 Created` (its effect happened), then its response body
/// panicked while the layer read it to store it. A body that *errors* there completes the key
/// (retry gets 410, the comment in `service.rs` says "the route ran"), but a *panic* unwinds
/// through idem's closure, and idem releases the key on a panic: the retry runs the route
/// again, a second effect. High: double effect. The body should be read outside the closure's
/// unwind (or a panic while reading it caught and treated like an error: done, not stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_panics_after_the_route_ran_lets_the_retry_run_it_again() {
    async fn pay(State(runs): State<Arc<AtomicU32>>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        let frames = [Some(Frame::data(Bytes::from_static(b"{\"id\":"))), None];
        (StatusCode::CREATED, Body::new(Frames(frames.into()))).into_response()
    }
    let mut wrong = Vec::new();
    for t in targets().await {
        let runs = Arc::new(AtomicU32::new(0));
        let router = Router::new()
            .route("/payments", post(pay))
            .layer(IdempotencyLayer::new(t.store.clone(), "review.panic"))
            .with_state(runs.clone());
        let (addr, _server) = serve(router).await;
        let client = reqwest::Client::new();
        for _ in 0..2 {
            // The first attempt's connection is dropped by the panic: an error here is expected.
            let _ = client
                .post(format!("http://{addr}/payments"))
                .header("idempotency-key", "pay-1")
                .body("{}")
                .send()
                .await
                .map(|r| r.status());
        }
        let runs = runs.load(Ordering::SeqCst);
        if runs != 1 {
            wrong.push(format!(
                "{}: the route ran {runs} times for one key",
                t.name
            ));
        }
        t.cleanup().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The route answered `201` and its body then failed while the layer read it to store it. The
/// route's effect happened (the key is completed, a retry gets 410 "processed"), but the first
/// client is told `500 urn:idem:problem:internal`, "the request could not be processed": the
/// opposite of what happened, so a client that trusts it (a new key for a fresh attempt, or a
/// person who pays again) makes the effect happen twice. Low-medium: the first client should
/// get what the retry gets (the `response-not-stored` problem: processed, response lost), or
/// the route's status with the body as far as it went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_fails_tells_the_first_client_it_was_not_processed() {
    async fn pay(State(runs): State<Arc<AtomicU32>>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(Bytes::from_static(b"{\"id\":"))).unwrap();
        tx.send(Err(std::io::Error::other("the cursor died")))
            .unwrap();
        (StatusCode::CREATED, Body::new(ChannelBody(rx))).into_response()
    }
    let runs = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(
            MemoryStore::new(),
            "review.body-error",
        ))
        .with_state(runs.clone());
    let (addr, _server) = serve(router).await;
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "pay-2")
            .body("{}")
            .send()
    };
    // The first client gets what the route gave, as it would without the layer: its status,
    // then a body that breaks off (or, if the server had not flushed the head yet, a broken
    // connection), never a problem saying nothing was done.
    match send().await {
        Ok(first) => {
            assert_eq!(first.status(), 201);
            assert!(
                first.bytes().await.is_err(),
                "the broken body reached its client whole"
            );
        }
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    let retry = seen(send().await.unwrap()).await;
    retry.assert_problem(410, "response-not-stored", &["pay-2"]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The route answers with trailers (a checksum, `grpc-status`, a final status of a streamed
/// job). The layer drops trailers from what it stores, and it also drops them from the *first*
/// response, which it rebuilds from the bytes it read, although the docs say its client gets
/// the response "as the route gave it". Low-medium: protocols that put the outcome in
/// trailers lose it on the first response too. The first response should keep its trailers
/// (and stored ones be replayed, or the route not be stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_response_keeps_the_routes_trailers() {
    async fn pay() -> Response {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        let frames = [
            Some(Frame::data(Bytes::from_static(b"paid"))),
            Some(Frame::trailers(trailers)),
        ];
        let mut headers = HeaderMap::new();
        headers.insert("trailer", "x-checksum".parse().unwrap());
        (
            StatusCode::CREATED,
            headers,
            Body::new(Frames(frames.into())),
        )
            .into_response()
    }
    let request = |key: &str| {
        format!(
            "POST /payments HTTP/1.1\r\nhost: x\r\nte: trailers\r\nconnection: close\r\n\
             idempotency-key: {key}\r\ncontent-length: 2\r\n\r\n{{}}"
        )
    };
    // Without the layer, the server sends them.
    let (plain, _s1) = serve(Router::new().route("/payments", post(pay))).await;
    let without = raw(plain, &request("t-0")).await;
    assert!(
        without.to_ascii_lowercase().contains("x-checksum: abc123"),
        "{without}"
    );
    let layered = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review.trailers"));
    let (addr, _s2) = serve(layered).await;
    let first = raw(addr, &request("t-1")).await;
    assert!(
        first.to_ascii_lowercase().contains("x-checksum: abc123"),
        "the first response lost the route's trailers:\n{first}"
    );
}

/// Who an authentication layer said the caller is.
#[derive(Clone)]
struct Account(String);

/// Keys are scoped by an `Account` extension that an authentication middleware sets, and the
/// middleware is added *before* the idempotency layer (`.layer(auth).layer(idem)`: in axum the
/// later layer is the outer one, a one-line ordering slip). The caller function then sees no
/// account on any request and returns `None`, which the layer takes as "the anonymous caller,
/// one for all" without a word: every account shares one key space, and since a replay is
/// answered before the inner service runs, a request with *no credentials at all* that sends
/// another account's key gets that account's stored payment, where the route would answer
/// 401. Medium (needs the ordering slip, but it is silent and leaks another caller's
/// response past authentication): with a `caller` configured, a request it names no one for
/// should not share a key space (pass it through unkeyed, or refuse it), or the layer should
/// at least make `None` an explicit opt-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_request_gets_another_accounts_response_when_caller_is_none() {
    async fn auth(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
        match req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(token) if token.starts_with("Bearer ") => {
                let account = Account(token["Bearer ".len()..].to_owned());
                req.extensions_mut().insert(account);
                next.run(req).await
            }
            _ => StatusCode::UNAUTHORIZED.into_response(),
        }
    }
    async fn pay(axum::Extension(Account(account)): axum::Extension<Account>) -> Response {
        (
            StatusCode::CREATED,
            format!("paid 500 EUR from {account}'s card"),
        )
            .into_response()
    }
    let idem = IdempotencyLayer::new(MemoryStore::new(), "review.auth")
        .caller(|req| req.extensions.get::<Account>().map(|a| a.0.clone()));
    let router = Router::new()
        .route("/payments", post(pay))
        .layer(axum::middleware::from_fn(auth))
        .layer(idem);
    let (addr, _server) = serve(router).await;
    let client = reqwest::Client::new();
    let alice = client
        .post(format!("http://{addr}/payments"))
        .header("authorization", "Bearer alice")
        .header("idempotency-key", "order-7")
        .body("{}")
        .send()
        .await
        .unwrap();
    // The slip is loud: with no caller named, the layer refuses every request (401), so no
    // request, Alice's included, shares a key space of nobody.
    assert_eq!(alice.status(), 401);
    let stranger = seen(
        client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "order-7")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        stranger.status,
        401,
        "a request without credentials got: {} (replayed: {}) {:?}",
        stranger.status,
        stranger.replayed,
        String::from_utf8_lossy(&stranger.body)
    );
}
