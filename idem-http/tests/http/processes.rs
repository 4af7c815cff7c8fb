//! Servers as OS processes on one PostgreSQL store: killed with SIGKILL mid-request and
//! restarted, and two of them racing on one key. The effect is a line appended to a ledger file.

use crate::support::*;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use idem_http::IdempotencyLayer;
use idem_runtime::PgStore;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const ROLE: &str = "IDEM_HTTP_SERVER_PROCESS";

/// The server process: run by the tests below (the test binary started again with `ROLE` set).
#[test]
fn server_process() {
    let Ok(table) = std::env::var(ROLE) else {
        return;
    };
    let ledger = PathBuf::from(std::env::var("LEDGER").unwrap());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let pool = idem_runtime::sqlx::PgPool::connect(&pg_url())
                .await
                .unwrap();
            let store = PgStore::with_table(pool, &table).unwrap();
            let layer =
                IdempotencyLayer::new(store, "http.processes").ttl(Duration::from_millis(800));
            let router = Router::new()
                .route("/payments", post(pay))
                .layer(layer)
                .with_state(Arc::new(ledger));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening on {}", listener.local_addr().unwrap());
            std::io::stdout().flush().unwrap();
            axum::serve(listener, router).await.unwrap();
        });
}

/// `x-delay-ms` (not part of the payload) makes the payment take that long, before its effect.
async fn pay(
    State(ledger): State<Arc<PathBuf>>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let delay = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&*ledger)
        .unwrap();
    writeln!(file, "{} {body}", std::process::id()).unwrap();
    (
        StatusCode::CREATED,
        format!("paid by {}", std::process::id()),
    )
}

struct Proc {
    child: Child,
    url: String,
}

impl Proc {
    fn start(table: &str, ledger: &std::path::Path) -> Proc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "processes::server_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, table)
            .env("LEDGER", ledger)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server process printed its address")
                .unwrap();
            // libtest prints `test <name> ... ` before it, on the same line.
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().to_owned();
            }
        };
        // Keep draining its output, so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Proc {
            child,
            url: format!("http://{addr}/payments"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn count_rows(pool: &idem_runtime::sqlx::PgPool, table: &str) -> i64 {
    idem_runtime::sqlx::query_scalar(idem_runtime::sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table}"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

fn ledger_lines(ledger: &std::path::Path) -> Vec<String> {
    match std::fs::read_to_string(ledger) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

async fn send(client: &reqwest::Client, url: &str, key: &str, delay_ms: u64) -> reqwest::Response {
    client
        .post(url)
        .header("idempotency-key", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body("order-77")
        .send()
        .await
        .unwrap()
}

/// What both tests start from: an idem table of their own, a ledger file, a client.
struct Setup {
    pool: idem_runtime::sqlx::PgPool,
    table: String,
    _dir: TempDir,
    ledger: PathBuf,
    client: reqwest::Client,
}

impl Setup {
    async fn new() -> Option<Setup> {
        let (store, pool) = pg_store().await?;
        let dir = TempDir::new();
        Some(Setup {
            pool,
            table: store.table().to_owned(),
            ledger: dir.0.join("ledger"),
            _dir: dir,
            client: reqwest::Client::new(),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_request_and_restarted_runs_the_retry_once() {
    let Some(s) = Setup::new().await else {
        return;
    };
    let (table, ledger, client) = (&s.table, &s.ledger, &s.client);
    let mut first = Proc::start(table, ledger);
    // A request that runs for a minute: the server is killed while it does.
    let doomed = {
        let (client, url) = (client.clone(), first.url.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .header("idempotency-key", "k9")
                .header("x-delay-ms", "60000")
                .body("order-77")
                .send()
                .await
        })
    };
    // Its key is claimed once its record is in the store; a copy is then told it is in flight.
    let started = std::time::Instant::now();
    while count_rows(&s.pool, table).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first request never claimed its key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(client, &first.url, "k9", 0).await.status(), 409);
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    assert!(doomed.await.unwrap().is_err(), "the killed server answered");
    let second = Proc::start(table, ledger);
    // The client retries as told, until the dead server's lease ends and its retry runs.
    let started = std::time::Instant::now();
    let answer = loop {
        let r = send(client, &second.url, "k9", 0).await;
        if r.status() != 409 {
            break seen(r).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still in flight after 30 s"
        );
        let after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(after)).await;
    };
    assert_eq!((answer.status, answer.replayed), (201, false), "{answer:?}");
    let again = seen(send(client, &second.url, "k9", 0).await).await;
    assert_eq!((again.replayed, &again.body), (true, &answer.body));
    assert_eq!(ledger_lines(ledger).len(), 1, "{:?}", ledger_lines(ledger));
    drop(second);
    Target::pg_cleanup(&s.pool, table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_on_one_store_run_a_key_once() {
    let Some(s) = Setup::new().await else {
        return;
    };
    let (table, ledger, client) = (&s.table, &s.ledger, &s.client);
    let servers = [Proc::start(table, ledger), Proc::start(table, ledger)];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (client, url) = (client.clone(), servers[i % 2].url.clone());
            tokio::spawn(async move { seen(send(&client, &url, "race", 300).await).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(ledger_lines(ledger).len(), 1, "{:?}", ledger_lines(ledger));
    drop(servers);
    Target::pg_cleanup(&s.pool, table).await;
}
