//! What the JetStream tests share: the servers (NATS, PostgreSQL, Redis), a stream of orders
//! per test, the effects table, worker processes, and the scenario line each test prints.
#![allow(dead_code)]

use std::fmt::Display;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool};
use idem_runtime::{PgStore, RedisStore};
use serde::{Deserialize, Serialize};

/// Whether we run under CI, where a missing server is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A server this test needs is not reachable: fail under CI, skip loudly elsewhere (the same
/// rule as the workspace's tests/support).
pub fn server_missing(service: &str, url: &str, err: impl Display) {
    if in_ci() {
        panic!("{service} at {url} is required under CI=true and is not reachable: {err}");
    }
    eprintln!(
        "\n!!!!! SKIPPED: {service} at {url} is not reachable ({err}).\n!!!!! This test did NOT run. Start {service}, or run `bash .ci/run`, which starts it.\n"
    );
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

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

/// The servers one test needs, or `None` (skipped loudly; a failure under CI).
pub struct Servers {
    pub js: jetstream::Context,
    pub pool: PgPool,
}

pub async fn servers() -> Option<Servers> {
    let client = match async_nats::connect(nats_url()).await {
        Ok(c) => c,
        Err(e) => {
            server_missing("NATS", &nats_url(), e);
            return None;
        }
    };
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
    Some(Servers {
        js: jetstream::new(client),
        pool,
    })
}

pub async fn redis_store(prefix: &str) -> Option<RedisStore> {
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
                .prefix(prefix)
                .build(),
        ),
        Err(e) => {
            server_missing("Redis", &redis_url(), e);
            None
        }
    }
}

/// The order a producer publishes: the business key is `id`, in the body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderPaid {
    pub id: i64,
    pub user: i64,
    pub amount: i64,
}

/// A stream of orders for one test: `T_<token>` on `t_<token>.orders`, its durable pull
/// consumer, and its dead-letter stream.
pub struct Orders {
    pub name: String,
    pub subject: String,
    pub consumer: PullConsumer,
}

pub struct ConsumerSettings {
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            ack_wait: Duration::from_secs(5),
            max_deliver: -1,
            max_ack_pending: 256,
        }
    }
}

pub async fn orders(js: &jetstream::Context, settings: ConsumerSettings) -> Orders {
    let token = idem_runtime::Token::generate().to_hex();
    let name = format!("T_{token}");
    let subject = format!("t_{token}.orders");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("create the stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("coupons".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: settings.max_ack_pending,
            ..Default::default()
        })
        .await
        .expect("create the consumer");
    Orders {
        name,
        subject,
        consumer,
    }
}

impl Orders {
    /// Publish `order` with a new message id each time (a producer's retry), and wait for the
    /// stream to keep it.
    pub async fn publish(&self, js: &jetstream::Context, order: &OrderPaid) {
        let body = serde_json::to_vec(order).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", unique("msg").as_str());
        js.publish_with_headers(self.subject.clone(), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publish a body as it is (new message id).
    pub async fn publish_raw(&self, js: &jetstream::Context, body: &'static [u8]) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", unique("msg").as_str());
        js.publish_with_headers(self.subject.clone(), headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The consumer as the server sees it now.
    pub async fn state(&self) -> jetstream::consumer::Info {
        self.consumer.get_info().await.unwrap()
    }

    /// The dead letters kept for this stream: (reason header, body).
    pub async fn dead_letters(
        &self,
        js: &jetstream::Context,
    ) -> Vec<(String, Vec<u8>, async_nats::HeaderMap)> {
        let Ok(mut stream) = js.get_stream(format!("{}_DEAD", self.name)).await else {
            return Vec::new();
        };
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.unwrap();
            let reason = m
                .headers
                .get(idem_nats::headers::REASON)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            out.push((reason, m.payload.to_vec(), m.headers.clone()));
        }
        out
    }

    pub async fn delete(&self, js: &jetstream::Context) {
        let _ = js.delete_stream(&self.name).await;
        let _ = js.delete_stream(format!("{}_DEAD", self.name)).await;
    }
}

/// The effects table: one row per effect, no unique key (only idem stands between a duplicate
/// and a second row).
pub async fn effects_table(pool: &PgPool) -> String {
    let t = unique("nats_effects");
    exec(
        pool,
        format!(
            "CREATE TABLE {t} (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, worker BIGINT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
        ),
    )
    .await;
    t
}

/// An idem table of the test's own (PostgreSQL), migrated.
pub async fn pg_store(pool: &PgPool) -> PgStore {
    let store = PgStore::with_table(pool.clone(), &unique("idem_nats")).unwrap();
    store.migrate().await.unwrap();
    store
}

pub async fn drop_pg_store(pool: &PgPool, store: &PgStore) {
    exec(pool, format!("DROP TABLE IF EXISTS {}", store.table())).await;
    exec(
        pool,
        format!("DROP TABLE IF EXISTS {}_migrations", store.table()),
    )
    .await;
}

pub async fn exec(pool: &PgPool, sql: String) {
    sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
}

pub async fn count(pool: &PgPool, sql: String) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Effects per order id.
pub async fn effects_per_order(pool: &PgPool, effects: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT order_id, count(*) FROM {effects} GROUP BY order_id ORDER BY order_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// What one test measured, printed as a row of the scenario table (`SCENARIO|...`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub deliveries: u64,
    pub effects: i64,
    pub acks: u64,
    pub redeliveries: u64,
    pub dead_letters: u64,
    pub held: u64,
}

impl Tally {
    pub fn count(&mut self, settled: &idem_nats::Settled, delivered: u32) {
        self.deliveries += 1;
        if delivered > 1 {
            self.redeliveries += 1;
        }
        match settled {
            idem_nats::Settled::Acked { held, .. } => {
                self.acks += 1;
                self.held += u64::from(*held);
            }
            idem_nats::Settled::DeadLettered { .. } => self.dead_letters += 1,
            _ => {}
        }
    }

    pub fn print(&self, scenario: &str, store: &str) {
        println!(
            "SCENARIO|{scenario}|NATS JetStream 2.9|{store}|{}|{}|{}|{}|{}|held {}",
            self.deliveries,
            self.effects,
            self.acks,
            self.redeliveries,
            self.dead_letters,
            self.held
        );
    }
}

/// How many times JetStream has delivered `msg`.
pub fn delivered(msg: &jetstream::Message) -> u32 {
    msg.info().map(|i| i.delivered as u32).unwrap_or(0)
}

/// Which worker a child process is, and what it works on.
pub fn worker_role() -> Option<(String, Vec<String>)> {
    let role = std::env::var("IDEM_NATS_WORKER").ok()?;
    let args = std::env::var("IDEM_NATS_WORKER_ARGS")
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    Some((role, args))
}

/// Start this test binary as a worker process (`worker_process` runs the role).
pub fn spawn_worker(role: &str, args: &[String]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDEM_NATS_WORKER", role)
        .env("IDEM_NATS_WORKER_ARGS", args.join(","))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn a worker process")
}

/// Worker processes, SIGKILLed when dropped (also when a test panics).
#[derive(Debug)]
pub struct Workers(pub Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
