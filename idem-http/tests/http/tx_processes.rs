//! The transactional form on an axum handler, in server processes killed with SIGKILL: the
//! payment row and the stored response commit in the handler's own PostgreSQL transaction, so a
//! server killed after the effect and before the commit leaves neither, and the client's retry
//! runs once. Two processes racing on one key make one payment.

use crate::support::*;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idem_http::{IdemError, IdempotencyKey};
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool, Postgres};
use idem_runtime::{PgStore, idempotent};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROLE: &str = "IDEM_HTTP_TX_SERVER_PROCESS";

#[derive(Clone)]
struct App {
    pool: PgPool,
    store: PgStore,
    payments: Arc<String>,
    progress: Arc<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct NewPayment {
    amount: u64,
}

#[derive(Serialize, Deserialize)]
struct Payment {
    id: i64,
    amount: u64,
    by: u32,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Idem(e) => IdemError(e).into_response(),
            AppError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    }
}

/// The effect and its stored output, in the caller's transaction.
#[idempotent(
    key = "key",
    tx = "tx",
    store = "app.store",
    fingerprint = "req",
    scope = "http.tx.pay"
)]
async fn record(
    app: &App,
    tx: &mut sqlx::Transaction<'static, Postgres>,
    key: IdempotencyKey,
    req: NewPayment,
    delay: Duration,
) -> Result<Payment, AppError> {
    let id: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "INSERT INTO {} (key, amount, pid) VALUES ($1, $2, $3) RETURNING id",
        app.payments
    )))
    .bind(&key.0)
    .bind(req.amount as i64)
    .bind(std::process::id() as i64)
    .fetch_one(&mut **tx)
    .await?;
    // Written, not committed: the test kills the server here.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&*app.progress)
        .unwrap();
    writeln!(f, "{} {}", key.0, std::process::id()).unwrap();
    drop(f);
    tokio::time::sleep(delay).await;
    Ok(Payment {
        id,
        amount: req.amount,
        by: std::process::id(),
    })
}

/// The axum handler: it begins the transaction, the idempotent fn writes in it, it commits.
async fn pay(
    State(app): State<App>,
    headers: HeaderMap,
    key: IdempotencyKey,
    Json(req): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), AppError> {
    let delay = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let mut tx = app.pool.begin().await?;
    let payment = record(&app, &mut tx, key, req, delay).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(payment)))
}

/// The server process (the test binary started again with `ROLE` set).
#[test]
fn tx_server_process() {
    let Ok(table) = std::env::var(ROLE) else {
        return;
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let pool = PgPool::connect(&pg_url()).await.unwrap();
            let app = App {
                store: PgStore::with_table(pool.clone(), &table).unwrap(),
                pool,
                payments: Arc::new(std::env::var("PAYMENTS").unwrap()),
                progress: Arc::new(PathBuf::from(std::env::var("PROGRESS").unwrap())),
            };
            let router = Router::new().route("/payments", post(pay)).with_state(app);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening on {}", listener.local_addr().unwrap());
            std::io::stdout().flush().unwrap();
            axum::serve(listener, router).await.unwrap();
        });
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(table: &str, payments: &str, progress: &Path) -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tx_processes::tx_server_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, table)
            .env("PAYMENTS", payments)
            .env("PROGRESS", progress)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server process printed its address")
                .unwrap();
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url: format!("http://{addr}/payments"),
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    pool: PgPool,
    table: String,
    payments: String,
    _dir: TempDir,
    progress: PathBuf,
    client: reqwest::Client,
}

impl Setup {
    async fn new() -> Option<Setup> {
        let (store, pool) = pg_store().await?;
        let payments = unique("payments_tx");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {payments} (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, amount BIGINT NOT NULL, pid BIGINT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let dir = TempDir::new();
        Some(Setup {
            pool,
            table: store.table().to_owned(),
            payments,
            progress: dir.0.join("progress"),
            _dir: dir,
            client: reqwest::Client::new(),
        })
    }

    fn server(&self) -> Server {
        Server::start(&self.table, &self.payments, &self.progress)
    }

    /// How many payments were made (committed) with `key`.
    async fn payments_of(&self, key: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE key = $1",
            self.payments
        )))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Lines the handler wrote after its effect (committed or not) for `key`.
    fn effects_written(&self, key: &str) -> usize {
        std::fs::read_to_string(&self.progress)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').next() == Some(key))
            .count()
    }

    async fn cleanup(self) {
        Target::pg_cleanup(&self.pool, &self.table).await;
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {}", self.payments)))
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

fn payment(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    delay_ms: u64,
) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .json(&NewPayment { amount: 1200 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_killed_between_the_effect_and_the_commit_never_double_a_payment() {
    let Some(s) = Setup::new().await else {
        return;
    };
    let keys = ["tx-a", "tx-b", "tx-c"];
    for (round, key) in keys.iter().enumerate() {
        // Each key's first request is killed with its payment written and not committed, once
        // per server, a server per round.
        let doomed = s.server();
        let request = tokio::spawn(payment(&s.client, &doomed.url, key, 60_000).send());
        let started = Instant::now();
        while s.effects_written(key) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: no effect"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // In flight meanwhile: a copy is refused, not run.
        let copy = seen(
            payment(&s.client, &doomed.url, key, 0)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(copy.status, 409, "round {round}: {copy:?}");
        doomed.kill();
        assert!(
            request.await.unwrap().is_err(),
            "the killed server answered"
        );
        assert_eq!(s.payments_of(key).await, 0, "rolled back with the server");
    }
    // A new server: each retry runs once (the dead transactions held nothing), and the retry's
    // retry is the stored response.
    let server = s.server();
    for key in keys {
        let first = seen(
            payment(&s.client, &server.url, key, 0)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(first.status, 201, "{key}: {first:?}");
        let again = seen(
            payment(&s.client, &server.url, key, 0)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((again.status, &again.body), (201, &first.body), "{key}");
        assert_eq!(s.payments_of(key).await, 1, "{key}");
        assert_eq!(
            s.effects_written(key),
            2,
            "{key}: the killed run and the retry"
        );
    }
    drop(server);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_racing_on_one_key_make_one_payment() {
    let Some(s) = Setup::new().await else {
        return;
    };
    let servers = [s.server(), s.server()];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let request = payment(&s.client, &servers[i % 2].url, "race", 200);
            tokio::spawn(async move { seen(request.send().await.unwrap()).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let made: Vec<_> = answers.iter().filter(|a| a.status == 201).collect();
    assert!(
        answers.iter().all(|a| a.status == 201 || a.status == 409),
        "{answers:?}"
    );
    assert!(!made.is_empty(), "{answers:?}");
    // Every 201 is the one payment (a later copy got it replayed).
    assert!(made.iter().all(|a| a.body == made[0].body), "{answers:?}");
    assert_eq!(s.payments_of("race").await, 1);
    drop(servers);
    s.cleanup().await;
}
