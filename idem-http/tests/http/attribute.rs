//! `#[idempotent]` on axum handlers as they are: the key from the `Idempotency-Key` extractor,
//! `Json<T>` and `(StatusCode, Json<T>)` outputs, idem's errors as problem+json.

use crate::support::*;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem_http::{IdemError, IdempotencyKey};
use idem_runtime::{MemoryStore, idempotent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Clone)]
struct App {
    store: Arc<MemoryStore>,
    runs: Arc<AtomicU32>,
}

#[derive(Deserialize, Serialize)]
struct NewPayment {
    amount: u64,
}

#[derive(Serialize, Deserialize)]
struct Payment {
    id: u32,
    amount: u64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error("declined")]
    Declined,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Idem(e) => IdemError(e).into_response(),
            AppError::Declined => (StatusCode::PAYMENT_REQUIRED, "declined").into_response(),
        }
    }
}

#[idempotent(
    key = "key",
    store = "app.store",
    fingerprint = "req",
    scope = "http.attr.pay"
)]
async fn pay(
    State(app): State<App>,
    key: IdempotencyKey,
    Json(req): Json<NewPayment>,
) -> Result<Json<Payment>, AppError> {
    let id = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if req.amount == 0 {
        return Err(AppError::Declined);
    }
    Ok(Json(Payment {
        id,
        amount: req.amount,
    }))
}

#[idempotent(key = "key", store = "app.store", scope = "http.attr.create")]
async fn create(
    State(app): State<App>,
    key: IdempotencyKey,
) -> Result<(StatusCode, Json<Payment>), AppError> {
    let id = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    Ok((StatusCode::CREATED, Json(Payment { id, amount: 1 })))
}

async fn start() -> (String, Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
    let app = App {
        store: Arc::new(MemoryStore::new()),
        runs: Arc::new(AtomicU32::new(0)),
    };
    let runs = app.runs.clone();
    let router = Router::new()
        .route("/pay", post(pay))
        .route("/create", post(create))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, runs, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_handler_returning_json_takes_the_attribute_as_it_is() {
    let (url, runs, _server) = start().await;
    let client = reqwest::Client::new();
    let pay = |key: Option<&str>, amount: u64| {
        let mut req = client
            .post(format!("{url}/pay"))
            .json(&NewPayment { amount });
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.send()
    };
    let first = seen(pay(Some("k-1"), 500).await.unwrap()).await;
    let again = seen(pay(Some("k-1"), 500).await.unwrap()).await;
    assert_eq!((first.status, again.status), (200, 200));
    assert_eq!(
        first.body, again.body,
        "the replay is the first response's body"
    );
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Another payload under the key: 422, as the layer answers it.
    pay(Some("k-1"), 900)
        .await
        .map(seen)
        .unwrap()
        .await
        .assert_problem(422, "key-reused", &["k-1", "http.attr"]);
    // No key, a malformed one: the extractor answers 400 before the handler runs.
    let missing = seen(pay(None, 500).await.unwrap()).await;
    missing.assert_problem(400, "missing-key", &[]);
    let bad = seen(pay(Some("has space"), 500).await.unwrap()).await;
    bad.assert_problem(400, "invalid-key", &[]);
    // The handler's own error releases the key: the retry runs.
    for _ in 0..2 {
        assert_eq!(pay(Some("k-0"), 0).await.unwrap().status(), 402);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_and_json_output_is_replayed_with_its_status() {
    let (url, runs, _server) = start().await;
    let client = reqwest::Client::new();
    let create = || {
        client
            .post(format!("{url}/create"))
            .header("idempotency-key", "c-1")
            .send()
    };
    let first = seen(create().await.unwrap()).await;
    let again = seen(create().await.unwrap()).await;
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body, again.body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
