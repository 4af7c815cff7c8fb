//! Shared by the glue's tests: the servers (the Kafka-protocol broker tansu, PostgreSQL), fresh
//! topics, a producer, the broker's committed offsets, the handlers (effects counted in
//! PostgreSQL: a table without a unique key, so only idem stands between a duplicate and a
//! second row), and the scenario table.
#![allow(dead_code, unreachable_pub)]

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idem_kafka::{End, Glue, Settled};
use idem_runtime::ack::Policy;
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool, Postgres, Transaction};
use idem_runtime::{PgStore, idempotent};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Whether we run under CI, where a missing server is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A server this test needs is not reachable: fail under CI, skip loudly elsewhere.
pub fn server_missing(service: &str, url: &str, err: impl Display) {
    if in_ci() {
        panic!("{service} at {url} is required under CI=true and is not reachable: {err}");
    }
    // Written to the process's stderr directly: libtest captures `eprintln!`, and a skip must
    // be seen.
    let notice = format!(
        "\n!!!!! SKIPPED: {service} at {url} is not reachable ({err}).\n!!!!! This test did NOT run. Start it with `bash scripts/services.sh`.\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
}

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

pub fn pg_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The broker, if it answers a metadata request.
pub async fn kafka() -> Option<()> {
    let url = brokers();
    let probe = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &url)
            .create()?;
        consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .map(|_| ())
    })
    .await
    .unwrap();
    match probe {
        Ok(()) => Some(()),
        Err(e) => {
            server_missing("Kafka (tansu)", &brokers(), e);
            None
        }
    }
}

pub async fn pg() -> Option<PgPool> {
    let url = pg_url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await;
    match pool {
        Ok(p) => Some(p),
        Err(e) => {
            server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

/// Both servers, or `None` (skipped, or a panic under CI).
pub async fn servers() -> Option<PgPool> {
    kafka().await?;
    pg().await
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}_{}_{}_{n}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_at(&brokers(), name, partitions).await
}

pub async fn create_topic_at(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

pub fn producer() -> FutureProducer {
    producer_at(&brokers())
}

pub fn producer_at(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// One record, to an explicit partition, acknowledged by the broker.
pub async fn produce(p: &FutureProducer, topic: &str, partition: i32, key: &str, payload: &[u8]) {
    p.send(
        FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
}

/// The consumer configuration the tests use (the issue's: a short session timeout).
pub fn config(group: &str) -> ClientConfig {
    config_at(&brokers(), group)
}

pub fn config_at(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000");
    c
}

/// What the glue settled, collected from `on_settled`.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<Settled>>>);

impl Log {
    pub fn all(&self) -> Vec<Settled> {
        self.0.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Settled records of one partition that were committed (done or dead-lettered).
    pub fn finals(&self, partition: i32) -> Vec<Settled> {
        self.all()
            .into_iter()
            .filter(|s| s.partition == partition && !matches!(s.end, End::Abandoned))
            .collect()
    }
}

pub fn glue(group: &str, policy: Policy, log: &Log) -> Glue {
    let log = log.clone();
    Glue::builder(config(group))
        .policy(policy)
        .on_settled(move |s| log.0.lock().unwrap().push(s.clone()))
        .build()
        .unwrap()
}

/// Wait until `done` holds, at most `secs` seconds.
pub async fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The offsets the broker has committed for `group` (the next offset to consume; `None` when
/// nothing was committed), per partition 0..`partitions`.
pub async fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    committed_at(&brokers(), group, topic, partitions).await
}

pub async fn committed_at(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<Option<i64>> {
    let (group, topic, bootstrap) = (group.to_owned(), topic.to_owned(), bootstrap.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config_at(&bootstrap, &group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        (0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect()
    })
    .await
    .unwrap()
}

/// The records of a topic's partition from the beginning, waiting up to `secs` for `n` of them.
pub async fn read_all(
    topic: &str,
    partition: i32,
    n: usize,
    secs: u64,
) -> Vec<rdkafka::message::OwnedMessage> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::Message;
        let consumer: BaseConsumer = config(&unique("reader")).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                assert_eq!(m.topic(), topic);
                out.push(m.detach());
            }
        }
        out
    })
    .await
    .unwrap()
}

/// The scenario table: one row per scenario, printed and appended to
/// `$CARGO_TARGET_DIR/idem-kafka-scenarios.txt` (or target/...).
pub fn row(scenario: &str, records: u64, deliveries: u64, effects: i64, commits: u64, dead: u64) {
    let line =
        format!("| {scenario} | {records} | {deliveries} | {effects} | {commits} | {dead} |");
    println!("SCENARIO {line}");
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{dir}/idem-kafka-scenarios.txt"))
    {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}

// ---- The handlers: effects are rows in PostgreSQL. ----

/// The body a producer sends: the business key is `order_id`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Order {
    pub order_id: i64,
    /// How long the handler takes after its effect.
    #[serde(default)]
    pub pause_ms: u64,
}

pub fn order(order_id: i64, pause_ms: u64) -> Vec<u8> {
    serde_json::to_vec(&Order { order_id, pause_ms }).unwrap()
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Body(#[from] serde_json::Error),
}

pub async fn create_effects(pool: &PgPool, effects: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {effects} (id BIGSERIAL PRIMARY KEY, order_id BIGINT NOT NULL, worker TEXT NOT NULL)"
    )))
    .execute(pool)
    .await
    .unwrap();
}

pub async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .unwrap();
}

pub async fn effect_count(pool: &PgPool, effects: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {effects}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Effect rows per order.
pub async fn effects_per_order(pool: &PgPool, effects: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT order_id, count(*) FROM {effects} GROUP BY order_id ORDER BY order_id"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A PostgreSQL idem store on a table of its own.
pub async fn pg_store(pool: &PgPool, table: &str) -> PgStore {
    let store = PgStore::with_table(pool.clone(), table).unwrap();
    store.migrate().await.unwrap();
    store
}

pub async fn drop_store(pool: &PgPool, table: &str) {
    drop_table(pool, table).await;
    drop_table(pool, &format!("{table}_migrations")).await;
}

/// The exactly-once handler: the coupon row and the done mark commit in the caller's
/// transaction.
#[idempotent(
    key = "{run}:{order_id}",
    tx = "tx",
    store = "store",
    scope = "idem_kafka.tests.coupon_tx",
    ttl = "10s"
)]
pub async fn coupon_tx(
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    run: &str,
    order_id: i64,
    effects: &str,
    worker: &str,
    pause_ms: u64,
) -> Result<i64, AppError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {effects} (order_id, worker) VALUES ($1, $2)"
    )))
    .bind(order_id)
    .bind(worker)
    .execute(&mut **tx)
    .await?;
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    Ok(order_id)
}

/// The plain attribute on the same store: claim, run (a row written at once), mark.
#[idempotent(
    key = "{run}:{order_id}",
    store = "store",
    scope = "idem_kafka.tests.coupon_plain",
    ttl = "10s"
)]
pub async fn coupon_plain(
    store: &PgStore,
    pool: &PgPool,
    run: &str,
    order_id: i64,
    effects: &str,
    worker: &str,
    pause_ms: u64,
) -> Result<i64, AppError> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {effects} (order_id, worker) VALUES ($1, $2)"
    )))
    .bind(order_id)
    .bind(worker)
    .execute(pool)
    .await?;
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    Ok(order_id)
}

/// What a test consumer needs to run a handler on a record: owned, so that the glue's handler
/// closure is `'static`.
#[derive(Clone)]
pub struct Ctx {
    pub pool: PgPool,
    pub store: PgStore,
    pub run: Arc<str>,
    pub effects: Arc<str>,
    pub worker: Arc<str>,
}

impl Ctx {
    /// Decode, begin, call, commit: `Ok` only after the commit.
    pub async fn handle_tx(&self, body: &[u8]) -> Result<i64, AppError> {
        let order: Order = serde_json::from_slice(body)?;
        let mut tx = self.pool.begin().await?;
        let coupon = coupon_tx(
            &self.store,
            &mut tx,
            &self.run,
            order.order_id,
            &self.effects,
            &self.worker,
            order.pause_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(coupon)
    }

    pub async fn handle_plain(&self, body: &[u8]) -> Result<i64, AppError> {
        let order: Order = serde_json::from_slice(body)?;
        coupon_plain(
            &self.store,
            &self.pool,
            &self.run,
            order.order_id,
            &self.effects,
            &self.worker,
            order.pause_ms,
        )
        .await
    }
}

/// A tansu broker of the test's own, on a free port, with a PostgreSQL database of its own
/// (created, loaded with tansu's schema, dropped by `remove`). `kill` and `start` again keep
/// its topics and offsets (they are in the database).
pub struct OwnBroker {
    pub port: u16,
    pub db: String,
    child: Option<std::process::Child>,
}

pub const TANSU: &str = "/opt/idem-brokers/bin/tansu";

impl OwnBroker {
    pub async fn new(admin: &PgPool) -> Option<OwnBroker> {
        if !std::path::Path::new(TANSU).exists() {
            server_missing("tansu", TANSU, "not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let db = unique("tansu_own");
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(admin)
            .await
            .unwrap();
        let url = format!("{}/{db}", pg_url().rsplit_once('/').unwrap().0);
        let pool = PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(
            include_str!("../../../scripts/tansu/pg-schema-0.6.0.sql").to_owned(),
        ))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let mut b = OwnBroker {
            port,
            db,
            child: None,
        };
        b.start().await;
        Some(b)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn start(&mut self) {
        assert!(self.child.is_none());
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let storage = format!(
            "{}/{}?sslmode=disable",
            pg_url().rsplit_once('/').unwrap().0,
            self.db
        );
        let child = std::process::Command::new(TANSU)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &storage, "--cluster-id", &self.db])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the broker stops at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn remove(mut self, admin: &PgPool) {
        self.kill();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db
        )))
        .execute(admin)
        .await
        .unwrap();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One record to partition 0 of a topic on another broker.
pub async fn produce_at(bootstrap: &str, topic: &str, key: &str, payload: &[u8]) {
    produce(&producer_at(bootstrap), topic, 0, key, payload).await
}
