//! Shared by the glue's tests: the servers (RabbitMQ, PostgreSQL, Redis), fresh queues, worker
//! processes, and the log the consumers write of what they did with each delivery.
#![allow(dead_code, unreachable_pub)]

use std::fmt::Display;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_rabbitmq::{Glue, QueueKind, Settled, Topology};
use idem_runtime::RedisStore;
use idem_runtime::sqlx::{self, PgPool};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// Whether we run under CI, where a missing server is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A server this test needs is not reachable: fail under CI, skip loudly elsewhere (the same
/// semantics as the workspace's tests/support).
pub fn server_missing(service: &str, url: &str, err: impl Display) {
    if in_ci() {
        panic!("{service} at {url} is required under CI=true and is not reachable: {err}");
    }
    eprintln!(
        "\n!!!!! SKIPPED: {service} at {url} is not reachable ({err}).\n!!!!! This test did NOT run. Start {service}, or run `bash .ci/run`, which starts it.\n"
    );
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn rabbit() -> Option<Connection> {
    let url = amqp_url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => Some(c),
        Err(e) => {
            server_missing("RabbitMQ", &url, e);
            None
        }
    }
}

pub async fn pg() -> Option<PgPool> {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
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

pub async fn redis() -> Option<RedisStore> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    // The store connects lazily: ping first, so that a missing Redis is not taken for an outage.
    let ping = async {
        let client = idem_runtime::redis::Client::open(url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        idem_runtime::redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
    };
    if let Err(e) = ping.await {
        server_missing("Redis", &url, e);
        return None;
    }
    match RedisStore::from_url(&url).await {
        Ok(s) => Some(s),
        Err(e) => {
            server_missing("Redis", &url, e);
            None
        }
    }
}

/// A name no other run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// A fresh consumer queue of `kind` (with the glue's dead-letter arguments, and a delivery limit
/// on quorum queues, as RabbitMQ 4 sets by default), and the glue for it.
pub async fn fresh_queue(
    conn: &Connection,
    name: &str,
    kind: QueueKind,
    policy: idem_runtime::ack::Policy,
) -> (Channel, Glue) {
    let glue = Glue::builder(name)
        .policy(policy)
        .build(conn)
        .await
        .expect("the glue");
    let channel = conn.create_channel().await.unwrap();
    let mut args = glue.topology().queue_arguments();
    if kind == QueueKind::Quorum {
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(20));
    }
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (channel, glue)
}

pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Publish `body` to `queue` with its own message id, as a producer does (the business key is in
/// the body), and wait for the broker's confirm.
pub async fn publish(channel: &Channel, queue: &str, message_id: &str, body: &[u8]) {
    let props = BasicProperties::default()
        .with_message_id(message_id.into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "the broker refused a test message");
}

/// Messages ready in `queue` (0 if it does not exist). On a channel of its own: a passive
/// declaration of a missing queue closes its channel.
pub async fn ready(conn: &Connection, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let channel = conn.create_channel().await.unwrap();
    let n = match channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => return 0,
    };
    let _ = channel.close(200, "ok".into()).await;
    n
}

/// Take every message of `queue` (acking them).
pub async fn drain(channel: &Channel, queue: &str) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m.delivery);
    }
    out
}

/// Every delay queue the glue may have used for `queue`.
pub fn delay_queues(queue: &str) -> Vec<String> {
    let t = Topology::new(queue);
    (0..=22)
        .map(|k| t.delay_queue(Duration::from_millis(1 << k)).0)
        .collect()
}

/// Messages waiting in all of `queue`'s delay queues.
pub async fn delayed(conn: &Connection, queue: &str) -> u32 {
    let mut n = 0;
    for q in delay_queues(queue) {
        n += ready(conn, &q).await;
    }
    n
}

/// Delete `queue` and the glue's queues for it.
pub async fn delete_all(channel: &Channel, queue: &str) {
    let mut names = delay_queues(queue);
    names.push(queue.to_owned());
    names.push(Topology::new(queue).dead_letter_queue().to_owned());
    for q in names {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

pub fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name)
}

pub fn header_text(d: &Delivery, name: &str) -> Option<String> {
    match header(d, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn header_int(d: &Delivery, name: &str) -> Option<i64> {
    match header(d, name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        _ => None,
    }
}

/// A short label for what `settle` did, for the consumers' logs.
pub fn label(s: &Settled) -> String {
    match s {
        Settled::Acked { outcome } => format!("acked:{}", outcome.map_or("none", |o| o.as_str())),
        Settled::Redelivered { reason, .. } => format!("redelivered:{}", reason.as_str()),
        Settled::DeadLettered { reason } => format!("dead:{}", reason.as_str()),
        other => format!("{other:?}"),
    }
}

/// Appends one line to a file shared by processes (one `write` with `O_APPEND`).
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

pub fn log_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"))
}

/// One line of a consumer's log: `ms worker message_id order_id redelivered returns event`.
#[derive(Debug, Clone)]
pub struct Line {
    pub ms: u128,
    pub worker: String,
    pub message_id: String,
    pub order: i64,
    pub redelivered: bool,
    pub event: String,
}

pub fn read_log(path: &std::path::Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 6).then(|| Line {
                ms: f[0].parse().unwrap(),
                worker: f[1].to_owned(),
                message_id: f[2].to_owned(),
                order: f[3].parse().unwrap(),
                redelivered: f[4] == "1",
                event: f[5].to_owned(),
            })
        })
        .collect()
}

/// The scenario table's row, printed by each scenario test.
#[allow(clippy::too_many_arguments)]
pub fn row(
    scenario: &str,
    store: &str,
    deliveries: usize,
    effects: i64,
    acks: usize,
    redeliveries: usize,
    dead: usize,
) {
    println!(
        "SCENARIO | {scenario} | RabbitMQ 3.10 | {store} | deliveries {deliveries} | effects {effects} | acks {acks} | redeliveries {redeliveries} | dead letters {dead}"
    );
}
