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

/// The authenticated user, as a third-party app's extractor gives it: an id of another crate
/// (uuid 0.8, which cannot implement idem's `KeyPart`).
struct AuthUser {
    user_id: uuid08::Uuid,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuthUser {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, StatusCode> {
        let id = parts
            .headers
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| uuid08::Uuid::parse_str(v).ok())
            .ok_or(StatusCode::UNAUTHORIZED)?;
        Ok(AuthUser { user_id: id })
    }
}

#[derive(Deserialize, Serialize)]
struct NewArticle {
    title: String,
}

#[derive(Serialize, Deserialize)]
struct Article {
    slug: String,
    author: String,
    n: u32,
}

/// The adoption: one attribute on the handler as it was, plus the optional key parameter.
#[idempotent(
    key = "{user.user_id}/{key}",
    store = "app.store",
    fingerprint = "req",
    scope = "http.attr.articles"
)]
async fn create_article(
    user: AuthUser,
    State(app): State<App>,
    key: Option<IdempotencyKey>,
    Json(req): Json<NewArticle>,
) -> Result<(StatusCode, Json<Article>), AppError> {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    Ok((
        StatusCode::CREATED,
        Json(Article {
            slug: format!("{}-{n}", req.title),
            author: user.user_id.to_string(),
            n,
        }),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_key_scoped_by_a_foreign_user_id_dedups_only_requests_that_send_it() {
    let app = App {
        store: Arc::new(MemoryStore::new()),
        runs: Arc::new(AtomicU32::new(0)),
    };
    let runs = app.runs.clone();
    let router = Router::new()
        .route("/articles", post(create_article))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let client = reqwest::Client::new();
    const ANN: &str = "67e55044-10b1-426f-9247-bb680e5fe0c8";
    const BOB: &str = "936da01f-9abd-4d9d-80c7-02af85c822a8";
    let post = |user: &str, key: Option<&str>, title: &str| {
        let mut req = client
            .post(format!("{url}/articles"))
            .header("x-user", user)
            .json(&NewArticle {
                title: title.into(),
            });
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.send()
    };
    // Without the header: a plain call each time, as before the attribute.
    for n in 1..=2 {
        let r = seen(post(ANN, None, "t").await.unwrap()).await;
        assert_eq!((r.status, r.replayed), (201, false));
        assert!(String::from_utf8_lossy(&r.body).contains(&format!("\"n\":{n}")));
    }
    // With it: once, and the retry gets the same 201 and body.
    let first = seen(post(ANN, Some("a-1"), "t").await.unwrap()).await;
    let again = seen(post(ANN, Some("a-1"), "t").await.unwrap()).await;
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body, again.body);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Another user with the same key: their own run, never Ann's article.
    let bob = seen(post(BOB, Some("a-1"), "t").await.unwrap()).await;
    assert_eq!(bob.status, 201);
    assert!(String::from_utf8_lossy(&bob.body).contains(BOB));
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    // The same key with another body: 422, as the layer answers it.
    seen(post(ANN, Some("a-1"), "other").await.unwrap())
        .await
        .assert_problem(422, "key-reused", &["a-1", "http.attr", ANN]);
    // A malformed key is still refused, not run without one.
    seen(post(ANN, Some("has space"), "t").await.unwrap())
        .await
        .assert_problem(400, "invalid-key", &[]);
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}
