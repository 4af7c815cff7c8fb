//! A second outside review, of the relay (the response sent to its client while it is read and
//! stored), the trailers, and the fixes of the first review. Each test failed when written,
//! is named after what breaks, and its doc comment says what is wrong and why it matters.
//! Real axum server on a loopback port, real client (reqwest or a raw TCP socket), real stores.

use crate::support::*;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body::Frame;
use idem_http::IdempotencyLayer;
use idem_runtime::MemoryStore;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response body of the given frames, every one ready at once (an export rendered in
/// memory, a body built from a stream of ready chunks).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// `n` data frames of `size` bytes each.
fn chunks(n: usize, size: usize) -> Frames {
    Frames(
        (0..n)
            .map(|_| Frame::data(Bytes::from(vec![b'x'; size])))
            .collect(),
    )
}

/// A raw HTTP/1.1 POST with `key`, on a socket with a small receive buffer; nothing is read.
async fn raw_post(addr: SocketAddr, key: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /export HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\n\
             content-length: 2\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s
}

const CHUNKS: usize = 1536;
const CHUNK: usize = 16 * 1024;

/// 24 MiB in 16 KiB frames, all ready: the route's work is done when it returns.
async fn export(State(runs): State<Arc<AtomicU32>>) -> Response {
    runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, Body::new(chunks(CHUNKS, CHUNK))).into_response()
}

fn export_app(layer: IdempotencyLayer) -> (Router, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route("/export", post(export))
        .layer(layer.max_response_body(64 * 1024 * 1024))
        .with_state(runs.clone());
    (router, runs)
}

async fn retry(client: &reqwest::Client, addr: SocketAddr, key: &str) -> (u16, bool, usize) {
    let r = client
        .post(format!("http://{addr}/export"))
        .header("idempotency-key", key)
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let replayed = r.headers().contains_key("idempotent-replayed");
    (status, replayed, r.bytes().await.unwrap().len())
}

/// The route ran and returned its whole (multi-frame, all-ready) response, but its client reads
/// slowly or not at all (a stalled mobile client, a proxy that buffers, a client that keeps the
/// connection and stops reading). The relay sends frames through a bounded channel of 8 and
/// *awaits* room in it inside idem's closure, so reading the route's body, storing it and
/// marking the key done all wait on that client's TCP window: the key stays in flight for as
/// long as the connection is held open (idem renews the lease meanwhile), and every retry, the
/// same client's from a new connection included, gets 409 for a request whose effect happened
/// long ago. High: a stuck key, decided by the client. The record is built in memory anyway
/// (up to `max_response_body`): the relay must never hold up the store (buffer what the client
/// has not taken, or drop the client's copy when it lags), only the client's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_keeps_the_key_in_flight() {
    let (router, runs) = export_app(IdempotencyLayer::new(MemoryStore::new(), "review2.stall"));
    let (addr, _server) = serve(router).await;
    let mut stalled = raw_post(addr, "export-1").await;
    // The head (and some of the body) arrives; then this client stops reading.
    let mut head = [0u8; 64];
    let n = stalled.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let client = reqwest::Client::new();
    let again = tokio::time::timeout(Duration::from_secs(10), retry(&client, addr, "export-1"))
        .await
        .expect("the retry did not get an answer");
    drop(stalled);
    assert_eq!(
        again,
        (200, true, CHUNKS * CHUNK),
        "3 s after the route returned its whole response, a retry got {} (replayed: {}), \
         not the replay: the key is held in flight by a client that does not read",
        again.0,
        again.1
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// As above, and then the lease: it is renewed only up to `max_lease` (default 1 h), after
/// which the key is free again although the route ran. A client that stops reading (or reads
/// slowly enough: a 1 h limit is reached by a few MiB at a modem's speed) thus makes the route
/// run twice: the retry after the lease is gone runs it again. The layer's docs say "a longer
/// stream loses its key to a retry", but here the route's body was ready at once; it is the
/// client's reading speed, not the route, that decides. High: double effect. (`max_lease` is
/// shortened to 2 s here so the test does not take an hour; the path is the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_lets_a_retry_run_the_route_again() {
    let mut wrong = Vec::new();
    for t in targets().await {
        let layer = IdempotencyLayer::new(t.store.clone(), "review2.lease")
            .ttl(Duration::from_millis(500))
            .max_lease(Duration::from_secs(1));
        let (router, runs) = export_app(layer);
        let (addr, _server) = serve(router).await;
        let mut stalled = raw_post(addr, "export-2").await;
        let mut head = [0u8; 64];
        let _ = stalled.read(&mut head).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let client = reqwest::Client::new();
        let again =
            tokio::time::timeout(Duration::from_secs(20), retry(&client, addr, "export-2")).await;
        drop(stalled);
        let runs = runs.load(Ordering::SeqCst);
        if runs != 1 {
            wrong.push(format!(
                "{}: the route ran {runs} times for one key (the retry got {:?})",
                t.name,
                again.map(|(s, r, _)| (s, r))
            ));
        }
        t.cleanup().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The README promises "trailers are relayed and replayed", and the trailers are stored, but
/// the replay never carries them over HTTP/1.1: `Stored` drops the `Trailer` header (it is in
/// the hop-by-hop list) and the replayed body has an exact size, so hyper frames it with
/// `Content-Length` and discards the trailers (it sends trailers only in a chunked body whose
/// `Trailer` header names them). The first client gets `x-checksum`, the retry of a client
/// that lost the response does not, and a protocol that puts its outcome in a trailer (a
/// checksum, `grpc-status`, a streamed job's final status) sees a different response. Medium:
/// the replay differs from the original. Replay a response with trailers chunked (no exact
/// size hint) and keep its `Trailer` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_drops_the_trailers_the_first_response_had() {
    async fn pay() -> Response {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        let frames = [
            Frame::data(Bytes::from_static(b"paid")),
            Frame::trailers(trailers),
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
    let layered = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(
            MemoryStore::new(),
            "review2.trailers",
        ));
    let (addr, _server) = serve(layered).await;
    let request = "POST /payments HTTP/1.1\r\nhost: x\r\nte: trailers\r\nconnection: close\r\n\
                   idempotency-key: t-1\r\ncontent-length: 2\r\n\r\n{}";
    let first = raw(addr, request).await.to_ascii_lowercase();
    assert!(first.contains("x-checksum: abc123"), "{first}");
    let replay = raw(addr, request).await.to_ascii_lowercase();
    assert!(replay.contains("idempotent-replayed: true"), "{replay}");
    assert!(
        replay.contains("x-checksum: abc123"),
        "the replay lost the trailers the first response had:\n--- first\n{first}\n--- replay\n{replay}"
    );
}

/// Send `request`, read the response until `content-length` bytes of body are in (what a
/// client does with a content-length response: it has the whole of it then), and return the
/// head and the body, without waiting for anything else on the connection.
async fn read_content_length_response(s: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("content-length")
                .trim()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return (head, buf[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = s.read(&mut tmp).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// "Its last frame goes out once the key is marked done, so a client that has the whole
/// response is answered with it on a retry": the relay holds back the last *frame*, but a
/// client has the whole response when it has the last *byte*. A route that sets
/// `Content-Length` and whose body ends with a frame that carries no byte (an empty chunk at
/// the end of a stream, or trailers, which HTTP/1.1 cannot send after a content-length body)
/// has all its bytes sent before the key is marked: the client has the whole response, its
/// immediate retry (a second request of a client that lost the first one's outcome in its
/// own process, or a fan-out) gets 409 "in flight" for a request that is finished. Medium: a
/// retry right after a whole response is not answered with it. Hold back the last *byte*
/// (the last data frame and everything after it), not the last frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_body_ending_in_an_empty_frame_is_whole_before_its_key_is_done() {
    async fn pay(State(runs): State<Arc<AtomicU32>>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        let frames = [
            Frame::data(Bytes::from_static(b"{\"id\":")),
            Frame::data(Bytes::from_static(b"1}")),
            Frame::data(Bytes::new()),
        ];
        let mut headers = HeaderMap::new();
        headers.insert("content-length", "8".parse().unwrap());
        (
            StatusCode::CREATED,
            headers,
            Body::new(Frames(frames.into())),
        )
            .into_response()
    }
    let mut wrong = Vec::new();
    for t in targets().await {
        let runs = Arc::new(AtomicU32::new(0));
        let router = Router::new()
            .route("/payments", post(pay))
            .layer(IdempotencyLayer::new(t.store.clone(), "review2.cl"))
            .with_state(runs.clone());
        let (addr, _server) = serve(router).await;
        let request = |key: &str| {
            format!(
                "POST /payments HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\n\
                 content-length: 2\r\n\r\n{{}}"
            )
        };
        for i in 0..20 {
            let key = format!("cl-{i}");
            let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
            first.write_all(request(&key).as_bytes()).await.unwrap();
            let (head, body) = read_content_length_response(&mut first).await;
            assert!(head.starts_with("http/1.1 201"), "{head}");
            assert_eq!(body, b"{\"id\":1}");
            // The client has the whole response: its retry, at once.
            let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
            second.write_all(request(&key).as_bytes()).await.unwrap();
            let (head, body) = read_content_length_response(&mut second).await;
            if !head.starts_with("http/1.1 201") {
                wrong.push(format!(
                    "{}: {key}: a retry after the whole response got {} {}",
                    t.name,
                    head.lines().next().unwrap_or(""),
                    String::from_utf8_lossy(&body)
                ));
                break;
            }
        }
        t.cleanup().await;
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A streamed response whose first event comes later (server-sent events that wait for the
/// first update, a long-poll, an export that computes before its first row): without the
/// layer, hyper sends the head at once and the client sees `200` and its headers; with it, the
/// head is held until the body's first frame (`Relay` releases the head only when a frame
/// arrives), so the client sees nothing, its read timeout fires, and its retry gets 409. The
/// first review's streaming test sends its first event before the request, so it does not
/// see this. Low-medium: a response held back that the README says is "relayed to its client
/// as the route gives it". The head could go out as soon as the route returns it (the record
/// only needs the key marked before the *last* item).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_responses_head_waits_for_its_first_event() {
    struct Later(Option<Pin<Box<tokio::time::Sleep>>>);
    impl http_body::Body for Later {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match &mut self.0 {
                None => Poll::Ready(None),
                Some(sleep) => {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    self.0 = None;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: 1\n\n")))))
                }
            }
        }
    }
    use std::future::Future;
    async fn events() -> Response {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "text/event-stream".parse().unwrap());
        let body = Later(Some(Box::pin(tokio::time::sleep(Duration::from_secs(5)))));
        (StatusCode::OK, headers, Body::new(body)).into_response()
    }
    let head_within_2s = |router: Router| async move {
        let (addr, _server) = serve(router).await;
        let send = reqwest::Client::new()
            .post(format!("http://{addr}/events"))
            .header("idempotency-key", "ev-1")
            .body("{}")
            .send();
        tokio::time::timeout(Duration::from_secs(2), send)
            .await
            .map(|r| r.unwrap().status().as_u16())
    };
    let plain = head_within_2s(Router::new().route("/events", post(events))).await;
    assert_eq!(plain, Ok(200), "without the layer the head comes at once");
    let layered = head_within_2s(
        Router::new()
            .route("/events", post(events))
            .layer(IdempotencyLayer::new(MemoryStore::new(), "review2.sse")),
    )
    .await;
    assert_eq!(
        layered,
        Ok(200),
        "with the layer, the head of a stream whose first event comes in 5 s did not arrive in 2 s"
    );
}

/// "One item behind" holds back every frame of a live stream until the *next* one exists, not
/// only the last: a server-sent event (a payment's "confirmed", an LLM's token, a job's
/// progress) reaches its client only when the route sends the following event, which for a
/// stream that waits for news can be minutes, or never if the next thing is the end after a
/// long wait. Without the layer the event is on the wire at once. Medium: a streamed response
/// is not "relayed to its client as the route gives it" (README); SSE clients see every event
/// late, heartbeats do not keep proxies' idle timeouts from firing. What must wait for the
/// mark is the client's *end* of the response (the channel's close, which is what ends a
/// chunked body, or the byte that completes a content-length), not each frame: send a frame
/// as soon as the body has nothing more ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_event_reaches_its_client_only_when_the_next_one_is_sent() {
    let (tx, handler) = event_stream();
    let router = Router::new()
        .route("/events", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review2.events"));
    let (addr, _server) = serve(router).await;
    tx.send(Ok(Bytes::from_static(b"data: confirmed\n\n")))
        .unwrap();
    let mut response = tokio::time::timeout(
        Duration::from_secs(3),
        reqwest::Client::new()
            .post(format!("http://{addr}/events"))
            .header("idempotency-key", "ev-2")
            .body("{}")
            .send(),
    )
    .await
    .expect("the head (it goes out with the first event)")
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), response.chunk()).await;
    // The next event, and the end, so nothing is left running.
    tx.send(Ok(Bytes::from_static(b"data: settled\n\n")))
        .unwrap();
    drop(tx);
    assert!(
        matches!(&first, Ok(Ok(Some(c))) if c.starts_with(b"data: confirmed")),
        "the stream's first event, sent before the request, had not reached its client 2 s \
         later: {first:?}"
    );
}

/// The first review's fix catches a panic in the body's `poll_frame`, but the body is still
/// *dropped* (and its `size_hint` asked) inside idem's closure without a guard: a body whose
/// drop panics (a lazily rendered body whose guard or cleanup asserts, a stream whose
/// producer's `Drop` unwraps) unwinds through idem's call after the route ran, idem releases
/// the key, and the retry runs the route again. Low (a panicking `Drop` is rare), but the
/// outcome is a double effect: drop the body inside `catch_unwind` too (and read `size_hint`
/// there), or drop it after the key is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_panics_when_dropped_lets_the_retry_run_the_route_again() {
    struct PanicOnDrop(Frames);
    impl http_body::Body for PanicOnDrop {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("the body's cleanup panicked");
            }
        }
    }
    async fn pay(State(runs): State<Arc<AtomicU32>>) -> Response {
        runs.fetch_add(1, Ordering::SeqCst);
        let body = PanicOnDrop(Frames([Frame::data(Bytes::from_static(b"paid"))].into()));
        (StatusCode::CREATED, Body::new(body)).into_response()
    }
    let runs = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route("/payments", post(pay))
        .layer(IdempotencyLayer::new(MemoryStore::new(), "review2.drop"))
        .with_state(runs.clone());
    let (addr, _server) = serve(router).await;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        // The first attempt's connection may be dropped by the panic.
        let _ = client
            .post(format!("http://{addr}/payments"))
            .header("idempotency-key", "drop-1")
            .body("{}")
            .send()
            .await
            .map(|r| r.status());
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the route ran twice for one key"
    );
}
