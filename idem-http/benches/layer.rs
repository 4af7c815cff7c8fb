//! The layer's cost, measured from outside: the same axum service without the layer, with it on
//! the memory store, on Redis, and on Redis behind `CachedStore`, served by a second process
//! (this binary started again as the server), loaded by keep-alive connections from this one.
//! First requests (a new key each) and replays (a key seen before).
//!
//! ```text
//! cargo bench -p idem-http --bench layer
//! IDEM_BENCH_SECS=5 IDEM_BENCH_CONCURRENCY=16,64 cargo bench -p idem-http --bench layer
//! ```
#![allow(missing_docs)]

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use idem_http::IdempotencyLayer;
use idem_runtime::{CachedStore, MemoryStore, RedisStore};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ROLE: &str = "IDEM_HTTP_BENCH_SERVER";
/// Keys made before the replay runs, then replayed round-robin.
const PREPARED: u64 = 2_000;
const SERVERS: [&str; 4] = ["none", "memory", "redis", "redis-cached"];

async fn pay(body: axum::body::Bytes) -> (StatusCode, String) {
    // A small JSON answer, as a payment API gives.
    (
        StatusCode::CREATED,
        format!(
            r#"{{"id":"pay_1","status":"succeeded","bytes":{}}}"#,
            body.len()
        ),
    )
}

fn serve(which: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let router = Router::new().route("/payments", post(pay));
        let keep = Duration::from_secs(300);
        let router = match which {
            "none" => router,
            "memory" => router.layer(IdempotencyLayer::new(MemoryStore::new(), "bench").keep(keep)),
            "redis" | "redis-cached" => {
                let url =
                    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
                let client = idem_runtime::redis::Client::open(url).unwrap();
                let prefix = format!("idem-http-bench:{}:", std::process::id());
                let store = RedisStore::builder_from_client(client)
                    .unwrap()
                    .prefix(prefix)
                    .build();
                if which == "redis" {
                    router.layer(IdempotencyLayer::new(store, "bench").keep(keep))
                } else {
                    // Replays of responses this server stored answered from its memory.
                    let store = CachedStore::new(store);
                    router.layer(IdempotencyLayer::new(store, "bench").keep(keep))
                }
            }
            other => panic!("unknown server {other}"),
        };
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
    fn start(which: &str) -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, which)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server printed its address")
                .unwrap();
            if let Some((_, addr)) = line.split_once("listening on ") {
                break addr.trim().to_owned();
            }
        };
        Server {
            child,
            url: format!("http://{addr}/payments"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    First,
    Replay,
}

struct Measured {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn load(url: &str, scenario: Scenario, concurrency: usize, secs: f64, run: u64) -> Measured {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let url: Arc<str> = url.into();
    let send = move |key: String| {
        client
            .post(&*url)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(r#"{"amount":1200,"currency":"EUR"}"#)
            .send()
    };
    if scenario == Scenario::Replay {
        for n in 0..PREPARED {
            let r = send(format!("r{run}-{n}")).await.unwrap();
            assert_eq!(r.status(), 201);
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, stop, send) = (next.clone(), stop.clone(), send.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let key = match scenario {
                        Scenario::First => format!("f{run}-{n}"),
                        Scenario::Replay => format!("r{run}-{}", n % PREPARED),
                    };
                    let t = Instant::now();
                    let r = send(key).await.unwrap();
                    assert_eq!(r.status(), 201);
                    let _ = r.bytes().await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    lat.sort();
    Measured {
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
    }
}

fn main() {
    if let Ok(which) = std::env::var(ROLE) {
        return serve(&which);
    }
    let secs: f64 = std::env::var("IDEM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let concurrency: Vec<usize> = std::env::var("IDEM_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "16,64".into())
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    let rounds: usize = std::env::var("IDEM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| scenario | connections | server | requests/s (median of {rounds} rounds) | p50 | p99 | ratio to no layer |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|");
    let mut run = 0;
    for scenario in [Scenario::First, Scenario::Replay] {
        for &c in &concurrency {
            // The servers in turn, round after round, so that drift in the machine's
            // load falls on all of them alike.
            let mut seen: [Vec<Measured>; 4] = Default::default();
            for _ in 0..rounds {
                for (i, which) in SERVERS.iter().enumerate() {
                    run += 1;
                    let server = Server::start(which);
                    seen[i].push(rt.block_on(load(&server.url, scenario, c, secs, run)));
                }
            }
            let medians: Vec<Measured> = seen
                .into_iter()
                .map(|mut m| {
                    m.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
                    m.swap_remove(m.len() / 2)
                })
                .collect();
            for (which, m) in SERVERS.iter().zip(&medians) {
                let name = match scenario {
                    Scenario::First => "first request",
                    Scenario::Replay => "replay",
                };
                let server = match *which {
                    "none" => "axum, no layer",
                    "memory" => "**idem-http**, memory",
                    "redis" => "**idem-http**, Redis",
                    _ => "**idem-http**, Redis + `CachedStore`",
                };
                println!(
                    "| {name} | {c} | {server} | {:.0} | {} µs | {} µs | {:.2} |",
                    m.per_sec,
                    m.p50.as_micros(),
                    m.p99.as_micros(),
                    m.per_sec / medians[0].per_sec
                );
            }
        }
    }
}
