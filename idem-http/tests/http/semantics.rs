//! Each row of the README's status table, on every store, through a real server and client.

use crate::support::*;
use idem_http::IdempotencyLayer;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn layer(t: &Target) -> IdempotencyLayer {
    IdempotencyLayer::new(t.store.clone(), "http.tests").keep(Duration::from_secs(120))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_the_first_response_byte_for_byte_with_the_replay_header() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t)).await;
        let first = post(
            &client,
            &server,
            "/payments",
            Some("k-1"),
            r#"{"amount":1200,"currency":"EUR"}"#,
        )
        .await;
        assert_eq!(first.status, 201, "{}: {first:?}", t.name);
        assert!(!first.replayed);
        // Reordered fields and other whitespace: the same JSON payload.
        let again = post(
            &client,
            &server,
            "/payments",
            Some("k-1"),
            r#"{ "currency": "EUR", "amount": 1200 }"#,
        )
        .await;
        assert!(again.replayed, "{}: {again:?}", t.name);
        // The application's own headers come back; a session cookie is not handed out again.
        assert_eq!(again.run, first.run);
        assert_eq!(first.set_cookie.as_deref(), Some("session=1"));
        assert_eq!(again.set_cookie, None);
        assert_eq!(
            (
                again.status,
                &again.content_type,
                &again.location,
                &again.body
            ),
            (
                first.status,
                &first.content_type,
                &first.location,
                &first.body
            ),
            "{}",
            t.name
        );
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        // The IETF draft's structured-field form of the same key.
        let quoted = post(
            &client,
            &server,
            "/payments",
            Some("\"k-1\""),
            r#"{"amount":1200,"currency":"EUR"}"#,
        )
        .await;
        assert!(quoted.replayed, "{}: {quoted:?}", t.name);
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_of_one_request_run_it_once() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t).retry_after(Duration::from_millis(1500))).await;
        let mut starts = server.watch_starts();
        let body = r#"{"amount":7,"hold":true}"#;
        let holder = spawn_post(&client, &server, "same", body);
        assert_eq!(starts.recv().await, Some(7));
        // Twenty copies at once while the first runs: each is told to come back later.
        let copies: Vec<_> = (0..20)
            .map(|_| spawn_post(&client, &server, "same", body))
            .collect();
        for copy in copies {
            let copy = copy.await.unwrap();
            copy.assert_problem(409, "in-flight", &["same", "http.tests"]);
            // What the application said its requests take, not the 60 s lease left.
            assert_eq!(copy.retry_after.as_deref(), Some("2"), "{}", t.name);
        }
        server.probe.hold.add_permits(1);
        let first = holder.await.unwrap();
        assert_eq!(first.status, 201, "{}: {first:?}", t.name);
        let after = post(&client, &server, "/payments", Some("same"), body).await;
        assert!(after.replayed);
        assert_eq!(after.body, first.body);
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_concurrent_copies_all_get_the_one_response() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t).wait(Duration::from_secs(20))).await;
        let copies: Vec<_> = (0..20)
            .map(|_| spawn_post(&client, &server, "w", r#"{"amount":3}"#))
            .collect();
        let mut answers = Vec::new();
        for copy in copies {
            answers.push(copy.await.unwrap());
        }
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        assert!(
            answers
                .iter()
                .all(|a| a.status == 201 && a.body == answers[0].body),
            "{}: {answers:?}",
            t.name
        );
        assert_eq!(
            answers.iter().filter(|a| !a.replayed).count(),
            1,
            "{}",
            t.name
        );
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_payload_route_or_method_is_422() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(
            layer(&t).fingerprint_header(http::HeaderName::from_static("x-currency")),
        )
        .await;
        let body = r#"{"amount":10}"#;
        let first = client
            .post(server.url("/payments"))
            .header("content-type", "application/json")
            .header("idempotency-key", "k")
            .header("x-currency", "EUR")
            .body(body)
            .send()
            .await
            .unwrap();
        // Read whole: until its last byte is in, the first request is still in flight.
        assert_eq!(seen(first).await.status, 201);
        let tries = [
            ("POST", "/payments", "EUR", r#"{"amount":11}"#),
            ("POST", "/refunds", "EUR", body),
            ("PATCH", "/payments", "EUR", body),
            ("POST", "/payments", "USD", body),
            ("POST", "/payments?dry=1", "EUR", body),
        ];
        for (method, path, currency, body) in tries {
            let r = client
                .request(method.parse().unwrap(), server.url(path))
                .header("content-type", "application/json")
                .header("idempotency-key", "k")
                .header("x-currency", currency)
                .body(body)
                .send()
                .await
                .unwrap();
            let r = seen(r).await;
            r.assert_problem(422, "key-reused", &["\"k\"", "http.tests"]);
            assert!(!r.replayed);
        }
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_key_is_400_and_runs_nothing() {
    let client = reqwest::Client::new();
    let t = targets().await.remove(0);
    let server = Server::start(layer(&t)).await;
    let body = r#"{"amount":1}"#;
    post(&client, &server, "/payments", None, body)
        .await
        .assert_problem(400, "missing-key", &[]);
    let long = "k".repeat(256);
    for bad in ["", "  ", "\"\"", "has space", long.as_str()] {
        post(&client, &server, "/payments", Some(bad), body)
            .await
            .assert_problem(400, "invalid-key", &[]);
    }
    let twice = client
        .post(server.url("/payments"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(body)
        .send()
        .await
        .unwrap();
    seen(twice).await.assert_problem(400, "invalid-key", &[]);
    let at_limit = "k".repeat(255);
    assert_eq!(
        post(&client, &server, "/payments", Some(&at_limit), body)
            .await
            .status,
        201
    );
    assert_eq!(server.probe.runs(), 1);
    // A route where the key is optional runs requests without one, each time.
    let optional = Server::start(layer(&t).optional()).await;
    for _ in 0..2 {
        let r = post(&client, &optional, "/payments", None, body).await;
        assert_eq!((r.status, r.replayed), (201, false));
    }
    assert_eq!(optional.probe.runs(), 2);
    // Safe methods pass through, key or not.
    for _ in 0..2 {
        let r = client
            .get(optional.url("/payments"))
            .header("idempotency-key", "g")
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(optional.probe.runs(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callers_with_the_same_key_never_see_each_other() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let by_account = layer(&t).caller(|req| {
            req.headers
                .get("x-account")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let server = Server::start(by_account).await;
        let send = |account: &'static str| {
            client
                .post(server.url("/payments"))
                .header("content-type", "application/json")
                .header("idempotency-key", "shared")
                .header("x-account", account)
                .body(r#"{"amount":5}"#)
                .send()
        };
        let alice = seen(send("alice").await.unwrap()).await;
        let bob = seen(send("bob").await.unwrap()).await;
        assert!(!alice.replayed && !bob.replayed, "{}", t.name);
        assert_ne!(alice.body, bob.body);
        assert_eq!(seen(send("alice").await.unwrap()).await.body, alice.body);
        assert_eq!(seen(send("bob").await.unwrap()).await.body, bob.body);
        assert_eq!(server.probe.runs(), 2, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_releases_the_key_and_the_retry_runs() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t)).await;
        server.probe.fail_next.store(1, Ordering::SeqCst);
        let body = r#"{"amount":9}"#;
        let failed = post(&client, &server, "/payments", Some("k5"), body).await;
        assert_eq!((failed.status, failed.replayed), (502, false), "{}", t.name);
        let retry = post(&client, &server, "/payments", Some("k5"), body).await;
        assert_eq!((retry.status, retry.replayed), (201, false), "{}", t.name);
        let again = post(&client, &server, "/payments", Some("k5"), body).await;
        assert!(again.replayed);
        assert_eq!(server.probe.runs(), 2, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_stored_only_when_asked() {
    let client = reqwest::Client::new();
    let t = targets().await.remove(0);
    let body = r#"{"amount":1,"status":400}"#;
    let server = Server::start(layer(&t)).await;
    for _ in 0..2 {
        let r = post(&client, &server, "/payments", Some("bad"), body).await;
        assert_eq!((r.status, r.replayed), (400, false));
    }
    assert_eq!(server.probe.runs(), 2);
    let stripe = Server::start(layer(&t).store_client_errors(true)).await;
    let first = post(&client, &stripe, "/payments", Some("bad"), body).await;
    let again = post(&client, &stripe, "/payments", Some("bad"), body).await;
    assert_eq!(
        (again.status, again.replayed, &again.body),
        (400, true, &first.body)
    );
    // 429 says "try again": never stored.
    let busy = r#"{"amount":1,"status":429}"#;
    for _ in 0..2 {
        assert!(
            !post(&client, &stripe, "/payments", Some("busy"), busy)
                .await
                .replayed
        );
    }
    assert_eq!(stripe.probe.runs(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_request_gets_the_response_on_its_retry() {
    use tokio::io::AsyncWriteExt;
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t).wait(Duration::from_secs(20))).await;
        let mut starts = server.watch_starts();
        let body = r#"{"amount":42,"hold":true}"#;
        let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let raw = format!(
            "POST /payments HTTP/1.1\r\nhost: x\r\nidempotency-key: gone\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(raw.as_bytes()).await.unwrap();
        assert_eq!(starts.recv().await, Some(42));
        // The client goes away while its request runs.
        drop(conn);
        server.probe.hold.add_permits(1);
        // Its retry waits for the run it started, and gets that run's response.
        let retry = post(&client, &server, "/payments", Some("gone"), body).await;
        assert_eq!(
            (retry.status, retry.replayed),
            (201, true),
            "{}: {retry:?}",
            t.name
        );
        assert_eq!(server.probe.runs(), 1, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_limit_reaches_its_client_and_a_retry_gets_410() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t).max_response_body(1024)).await;
        let body = r#"{"amount":1,"size":300000}"#;
        let first = post(&client, &server, "/payments", Some("big"), body).await;
        assert_eq!(
            (first.status, first.body.len()),
            (200, 300_000),
            "{}",
            t.name
        );
        let retry = post(&client, &server, "/payments", Some("big"), body).await;
        retry.assert_problem(410, "response-not-stored", &["big"]);
        assert!(retry.replayed);
        // Within the limit: stored as usual.
        let small = r#"{"amount":1,"size":1000}"#;
        assert_eq!(
            post(&client, &server, "/payments", Some("small"), small)
                .await
                .status,
            200
        );
        assert!(
            post(&client, &server, "/payments", Some("small"), small)
                .await
                .replayed
        );
        assert_eq!(server.probe.runs(), 2, "{}", t.name);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_is_413_and_claims_nothing() {
    let client = reqwest::Client::new();
    for t in targets().await {
        let server = Server::start(layer(&t).max_request_body(64)).await;
        let big = format!(r#"{{"amount":1,"pad":"{}"}}"#, "x".repeat(100));
        post(&client, &server, "/payments", Some("k413"), &big)
            .await
            .assert_problem(413, "request-too-large", &["k413"]);
        // The key was never claimed: a request within the limit runs at once.
        let ok = post(
            &client,
            &server,
            "/payments",
            Some("k413"),
            r#"{"amount":1}"#,
        )
        .await;
        assert_eq!((ok.status, ok.replayed), (201, false), "{}", t.name);
        assert_eq!(server.probe.runs(), 1);
        t.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_503_with_retry_after_and_runs_nothing() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = idem_runtime::redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let store = idem_runtime::RedisStore::from_client(client).await.unwrap();
    let layer = IdempotencyLayer::new(store, "http.tests").retry_after(Duration::from_secs(3));
    let server = Server::start(layer).await;
    let r = post(
        &reqwest::Client::new(),
        &server,
        "/payments",
        Some("down-1"),
        r#"{"amount":1}"#,
    )
    .await;
    r.assert_problem(
        503,
        "unavailable",
        &["down-1", "http.tests", &port.to_string()],
    );
    assert_eq!(r.retry_after.as_deref(), Some("3"));
    assert_eq!(server.probe.runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_reaches_its_client_event_by_event_and_is_replayed_whole() {
    for t in targets().await {
        let (events, route) = event_stream();
        let router = axum::Router::new()
            .route("/events", axum::routing::post(route))
            .layer(layer(&t));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let _server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let client = reqwest::Client::new();
        let send = || client.post(&url).header("idempotency-key", "sse").send();
        events.send(Ok("data: 1\n\n".into())).unwrap();
        let mut first = send().await.unwrap();
        // The first event arrives while the route has not produced the second.
        let chunk = first.chunk().await.unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"data: 1\n\n"[..]), "{}", t.name);
        events.send(Ok("data: 2\n\n".into())).unwrap();
        let chunk = first.chunk().await.unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"data: 2\n\n"[..]), "{}", t.name);
        // A copy while the stream runs is told to come back later.
        assert_eq!(seen(send().await.unwrap()).await.status, 409, "{}", t.name);
        drop(events); // the stream ends
        assert_eq!(first.chunk().await.unwrap(), None);
        // Once its client has it whole, a retry is answered with all of it.
        let again = seen(send().await.unwrap()).await;
        assert_eq!(
            (again.status, again.replayed),
            (200, true),
            "{}: {again:?}",
            t.name
        );
        assert_eq!(again.body, b"data: 1\n\ndata: 2\n\n");
        t.cleanup().await;
    }
}
