//! What the HTTP tests share: the stores (memory, and the real Redis, PostgreSQL and SQLite),
//! a test service served on a loopback port, and a real HTTP client.
#![allow(dead_code)]

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing;
use idem_http::IdempotencyLayer;
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool};
use idem_runtime::{MemoryStore, PgStore, RedisStore, SqliteStore, Store};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

pub use crate::shared::server_missing;

pub fn pg_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A name no other run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", idem_runtime::Token::generate().to_hex())
}

/// One store a test runs on, and how to clean up after it.
pub struct Target {
    pub name: &'static str,
    pub store: Arc<dyn Store>,
    pg: Option<(PgPool, String)>,
    _dir: Option<TempDir>,
}

impl Target {
    pub async fn cleanup(self) {
        if let Some((pool, table)) = self.pg {
            Target::pg_cleanup(&pool, &table).await;
        }
    }

    pub async fn pg_cleanup(pool: &PgPool, table: &str) {
        for t in [table.to_owned(), format!("{table}_migrations")] {
            sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

/// A directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("idem_http"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn pg_store() -> Option<(PgStore, PgPool)> {
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg_url())
        .await
    {
        Ok(p) => p,
        Err(e) => {
            server_missing("PostgreSQL", &pg_url(), e);
            return None;
        }
    };
    let store = PgStore::with_table(pool.clone(), &unique("idem_http")).unwrap();
    store.migrate().await.unwrap();
    Some((store, pool))
}

pub async fn redis_store() -> Option<RedisStore> {
    let client = idem_runtime::redis::Client::open(redis_url()).unwrap();
    let probe = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        idem_runtime::redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
    };
    match probe.await {
        Ok(_) => Some(
            RedisStore::builder_from_client(client)
                .unwrap()
                .prefix(unique("idem_http"))
                .build(),
        ),
        Err(e) => {
            server_missing("Redis", &redis_url(), e);
            None
        }
    }
}

/// Every store the layer is tested on: memory, SQLite (a file), and the real Redis and
/// PostgreSQL (missing ones fail under CI).
pub async fn targets() -> Vec<Target> {
    let mut out = vec![Target {
        name: "memory",
        store: Arc::new(MemoryStore::new()),
        pg: None,
        _dir: None,
    }];
    let dir = TempDir::new();
    let sqlite = SqliteStore::open(dir.0.join("idem.sqlite")).await.unwrap();
    out.push(Target {
        name: "sqlite",
        store: Arc::new(sqlite),
        pg: None,
        _dir: Some(dir),
    });
    if let Some(redis) = redis_store().await {
        out.push(Target {
            name: "redis",
            store: Arc::new(redis),
            pg: None,
            _dir: None,
        });
    }
    if let Some((store, pool)) = pg_store().await {
        let table = store.table().to_owned();
        out.push(Target {
            name: "postgres",
            store: Arc::new(store),
            pg: Some((pool, table)),
            _dir: None,
        });
    }
    // Redis in front of PostgreSQL (a table of its own): the answers come from the front, the
    // record is kept in the database.
    if let Some((durable, pool)) = pg_store().await
        && let Some(redis) = redis_store().await
    {
        let table = durable.table().to_owned();
        out.push(Target {
            name: "layered",
            store: Arc::new(idem_runtime::LayeredStore::new(redis, durable)),
            pg: Some((pool, table)),
            _dir: None,
        });
    }
    // Done records answered in-process, in front of Redis.
    if let Some(redis) = redis_store().await {
        out.push(Target {
            name: "cached",
            store: Arc::new(idem_runtime::CachedStore::new(redis)),
            pg: None,
            _dir: None,
        });
    }
    if let Some(store) = cluster_store().await {
        out.push(Target {
            name: "redis-cluster",
            store: Arc::new(store),
            pg: None,
            _dir: None,
        });
    }
    out
}

/// A store on a private 3-master Redis Cluster, started once per test binary (its servers die
/// with the process), a key prefix of its own per call.
pub async fn cluster_store() -> Option<RedisStore> {
    static CLUSTER: std::sync::OnceLock<Option<crate::redis_support::RedisCluster>> =
        std::sync::OnceLock::new();
    let cluster = CLUSTER
        .get_or_init(crate::redis_support::cluster_or_skip)
        .as_ref()?;
    let store = RedisStore::builder_from_cluster_urls(cluster.urls())
        .await
        .unwrap()
        .prefix(unique("idem_http"))
        .build();
    Some(store)
}

/// The test service's state: how often each route's handler ran, and the controls a test has
/// over it.
pub struct Probe {
    /// Handler runs (the effect), on every route.
    pub runs: AtomicU32,
    /// The next this many runs answer 502 (after counting as a run).
    pub fail_next: AtomicU32,
    /// Runs asked to hold (`"hold": true`) wait here for a permit.
    pub hold: Semaphore,
    /// Each run sends its body's `amount` here as it starts.
    pub started: std::sync::Mutex<Option<mpsc::UnboundedSender<u64>>>,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe {
            runs: AtomicU32::new(0),
            fail_next: AtomicU32::new(0),
            hold: Semaphore::new(0),
            started: std::sync::Mutex::new(None),
        }
    }
}

impl Probe {
    pub fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

#[derive(Deserialize)]
struct Order {
    amount: u64,
    #[serde(default)]
    hold: bool,
    /// Answer with this status (and a small JSON body) instead of 201.
    #[serde(default)]
    status: Option<u16>,
    /// Answer with a body of this many bytes.
    #[serde(default)]
    size: Option<usize>,
}

async fn order(State(probe): State<Arc<Probe>>, body: axum::body::Bytes) -> Response {
    let run = probe.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let order: Order = serde_json::from_slice(&body).unwrap_or(Order {
        amount: 0,
        hold: false,
        status: None,
        size: None,
    });
    if let Some(tx) = &*probe.started.lock().unwrap() {
        let _ = tx.send(order.amount);
    }
    if order.hold {
        probe.hold.acquire().await.unwrap().forget();
    }
    if probe
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::BAD_GATEWAY, "the bank did not answer").into_response();
    }
    if let Some(size) = order.size {
        return (StatusCode::OK, "x".repeat(size)).into_response();
    }
    if let Some(status) = order.status {
        let status = StatusCode::from_u16(status).unwrap();
        return (status, axum::Json(serde_json::json!({"refused": run}))).into_response();
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::LOCATION,
        format!("/payments/{run}").parse().unwrap(),
    );
    headers.insert("x-run", run.to_string().parse().unwrap());
    headers.insert(
        header::SET_COOKIE,
        format!("session={run}").parse().unwrap(),
    );
    (
        StatusCode::CREATED,
        headers,
        axum::Json(serde_json::json!({"id": run, "amount": order.amount})),
    )
        .into_response()
}

/// A running test service: `layer` around routes `/payments` (POST, PATCH, GET) and `/refunds`.
pub struct Server {
    pub addr: SocketAddr,
    pub probe: Arc<Probe>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(layer: IdempotencyLayer) -> Server {
        let probe = Arc::new(Probe::default());
        let router = Router::new()
            .route("/payments", routing::post(order).patch(order).get(order))
            .route("/refunds", routing::post(order))
            .layer(layer)
            .with_state(probe.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Server { addr, probe, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Runs announce themselves on the returned channel from now on.
    pub fn watch_starts(&self) -> mpsc::UnboundedReceiver<u64> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.probe.started.lock().unwrap() = Some(tx);
        rx
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A POST of `body` (JSON) to `path` with `key`.
pub async fn post_json(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut req = client
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.send().await.unwrap()
}

/// [`post_json`], as the tests compare responses.
pub async fn post(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Seen {
    seen(post_json(client, server, path, key, body).await).await
}

/// [`post`] to `/payments` on a task of its own.
pub fn spawn_post(
    client: &reqwest::Client,
    server: &Server,
    key: &'static str,
    body: &'static str,
) -> tokio::task::JoinHandle<Seen> {
    let client = client.clone();
    let req = client
        .post(server.url("/payments"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body);
    tokio::spawn(async move { seen(req.send().await.unwrap()).await })
}

/// A response as the tests compare them: status, the headers that matter, body.
#[derive(Debug, PartialEq)]
pub struct Seen {
    pub status: u16,
    pub replayed: bool,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub retry_after: Option<String>,
    pub run: Option<String>,
    pub set_cookie: Option<String>,
    pub body: Vec<u8>,
}

pub async fn seen(r: reqwest::Response) -> Seen {
    let h = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, content_type, location, retry_after) = (
        r.status().as_u16(),
        h("content-type"),
        h("location"),
        h("retry-after"),
    );
    let replayed = match h("idempotent-replayed").as_deref() {
        None => false,
        Some("true") => true,
        Some(other) => panic!("idempotent-replayed: {other}"),
    };
    Seen {
        status,
        replayed,
        content_type,
        location,
        retry_after,
        run: h("x-run"),
        set_cookie: h("set-cookie"),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

impl Seen {
    /// A problem+json answer of `status` and type `urn:idem:problem:<kind>` that shows none of
    /// `secrets` (the key, the scope).
    pub fn assert_problem(&self, status: u16, kind: &str, secrets: &[&str]) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json")
        );
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(body["type"], format!("urn:idem:problem:{kind}"), "{body}");
        assert_eq!(body["status"], status);
        let text = String::from_utf8_lossy(&self.body);
        for secret in secrets.iter().chain(&["idem_http", "idem_runtime", "::"]) {
            assert!(!text.contains(secret), "{text} shows {secret}");
        }
    }
}

/// Serve `router` on a loopback port; the server stops with the returned guard.
pub async fn serve(router: Router) -> (SocketAddr, AbortOnDrop) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (addr, AbortOnDrop(task))
}

pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A raw HTTP/1.1 exchange on a new connection: send `request`, read until the server closes
/// (at most 3 s).
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body fed from a channel: a chunk per message, an error on `Err`.
pub struct ChannelBody(pub mpsc::UnboundedReceiver<Result<bytes::Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|r| r.map(http_body::Frame::data)))
    }
}

type Events = mpsc::UnboundedSender<Result<bytes::Bytes, std::io::Error>>;
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// A route that runs once and answers `200 text/event-stream` with the events sent on the
/// returned sender; the stream ends when the sender is dropped.
pub fn event_stream() -> (Events, impl Fn() -> Answer + Clone + Send + Sync + 'static) {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let route = move || -> Answer {
        let rx = rx.lock().unwrap().take().expect("one run");
        Box::pin(async move {
            let headers = [(header::CONTENT_TYPE, "text/event-stream")];
            (
                StatusCode::OK,
                headers,
                axum::body::Body::new(ChannelBody(rx)),
            )
                .into_response()
        })
    };
    (tx, route)
}
