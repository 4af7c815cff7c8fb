//! An rdkafka consumer loop without idem, and the same work with the glue.
//!
//! The producer sends "order paid" records with the duplicates a real one makes (a retry sends
//! the same order as a new record). The loop without idem issues a coupon per record; with idem,
//! the handler has one attribute and the glue runs the loop, committing each offset once its
//! record is done.
//!
//! `cargo run -p idem-kafka --example coupon-consumer` (a Kafka-protocol broker at
//! KAFKA_BROKERS, default `127.0.0.1:9092`: `bash scripts/services.sh` starts tansu there; the
//! idem store is in memory).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_kafka::Glue;
use idem_runtime::{MemoryStore, idempotent};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPaid {
    id: u64,
    user: u64,
}

/// Coupons issued, per order (the effect we count).
static COUPONS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

fn give_coupon(order: u64) -> u64 {
    *COUPONS.lock().unwrap().entry(order).or_default() += 1;
    order * 1000
}

// ---- Before: the handler as it is. ----
async fn issue_coupon_plain(order_id: u64, _user: u64) -> Result<u64, AppError> {
    Ok(give_coupon(order_id))
}

// ---- After: the same handler, one attribute. ----
#[idempotent(key = "order_id", ttl = "30s")]
async fn issue_coupon(order_id: u64, _user: u64) -> Result<u64, AppError> {
    Ok(give_coupon(order_id))
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Body(#[from] serde_json::Error),
}

/// Orders 1..=5; 2 and 4 sent again by the producer, 4 twice.
const STREAM: [u64; 8] = [1, 2, 2, 3, 4, 4, 4, 5];

fn config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000");
    c
}

async fn topic_with_orders(brokers: &str, topic: &str) -> Result<(), Box<dyn std::error::Error>> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| format!("creating {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for id in STREAM {
        let body = serde_json::to_vec(&OrderPaid { id, user: 7 })?;
        producer
            .send(
                FutureRecord::to(topic).key(&id.to_string()).payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn report(title: &str) {
    let coupons = std::mem::take(&mut *COUPONS.lock().unwrap());
    let line: Vec<String> = coupons
        .iter()
        .map(|(o, n)| format!("order {o}: {n}"))
        .collect();
    println!("{title:<12} coupons per order: {}", line.join(", "));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    idem_runtime::install_default_store(MemoryStore::new())?;
    println!(
        "{} records of 5 orders (2 and 4 sent again by the producer)\n",
        STREAM.len()
    );

    // ---- Before: the usual rdkafka loop. Every record issues a coupon. ----
    let topic = format!("idem-example.coupons.before.{run}");
    topic_with_orders(&brokers, &topic).await?;
    let consumer: StreamConsumer = config(&brokers, &format!("before-{run}"))
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    for _ in STREAM {
        let record = consumer.recv().await?;
        let order: OrderPaid = serde_json::from_slice(record.payload().unwrap_or_default())?;
        issue_coupon_plain(order.id, order.user).await?;
        consumer.commit_message(&record, CommitMode::Async)?;
    }
    report("without idem");

    // ---- After: the glue runs the loop and commits what is done. ----
    let topic = format!("idem-example.coupons.after.{run}");
    topic_with_orders(&brokers, &topic).await?;
    let settled = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&settled);
    let glue = Glue::builder(config(&brokers, &format!("after-{run}")))
        .on_settled(move |_| *counter.lock().unwrap() += 1)
        .build()?;
    glue.subscribe(&[&topic])?;
    let stats = glue
        .run_until(
            |record: Arc<OwnedMessage>| async move {
                // The business key is in the body, never the offset.
                let order: OrderPaid =
                    serde_json::from_slice(record.payload().unwrap_or_default())?;
                issue_coupon(order.id, order.user).await
            },
            async {
                while *settled.lock().unwrap() < STREAM.len() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await?;
    report("with idem");
    println!(
        "\nwith idem: {} records, {} handler runs, {} commits",
        stats.records, stats.runs, stats.commits_requested
    );
    Ok(())
}
