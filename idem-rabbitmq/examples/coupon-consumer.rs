//! A lapin consumer loop without idem, and the same loop with it.
//!
//! The producer publishes "order paid" messages with the duplicates a real one makes (a retry
//! with a new message id). The loop without idem issues a coupon per delivery; the loop with idem
//! is the same loop with one attribute on the handler and `glue.settle` instead of `ack`.
//!
//! `cargo run -p idem-rabbitmq --example coupon-consumer` (RabbitMQ at AMQP_URL, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; the idem store is in memory).

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures_util::StreamExt;
use idem_rabbitmq::{Glue, Settled};
use idem_runtime::{MemoryStore, idempotent};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

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

/// Orders 1..=5; 2 and 4 re-sent by the producer with new message ids, 4 twice.
const STREAM: [u64; 8] = [1, 2, 2, 3, 4, 4, 4, 5];

async fn produce(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    for (n, id) in STREAM.iter().enumerate() {
        let body = serde_json::to_vec(&OrderPaid { id: *id, user: 7 }).unwrap();
        let props = BasicProperties::default().with_message_id(format!("msg-{n}").as_str().into());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?
            .await?;
    }
    Ok(())
}

async fn consume(channel: &Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    channel
        .basic_consume(
            queue.into(),
            queue.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
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
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    idem_runtime::install_default_store(MemoryStore::new())?;
    println!(
        "{} deliveries of 5 orders (2 and 4 re-sent by the producer)\n",
        STREAM.len()
    );

    // ---- Before: the tutorial's worker. Every delivery issues a coupon. ----
    let queue = "idem-example.coupons.before";
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    produce(&channel, queue).await?;
    let mut consumer = consume(&channel, queue).await?;
    for _ in STREAM {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        let order: OrderPaid = serde_json::from_slice(&delivery.data)?;
        issue_coupon_plain(order.id, order.user).await?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    report("without idem");

    // ---- After: the same loop; the glue decides ack, redeliver later, or dead-letter. ----
    let queue = "idem-example.coupons.after";
    let glue = Glue::builder(queue).build(&conn).await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            glue.topology().queue_arguments(),
        )
        .await?;
    produce(&channel, queue).await?;
    let mut consumer = consume(&channel, queue).await?;
    let mut replayed = 0;
    for _ in STREAM {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        let settled = glue
            .settle(&delivery, async {
                let order: OrderPaid = serde_json::from_slice(&delivery.data)?; // the business key is in the body
                issue_coupon(order.id, order.user).await
            })
            .await?; // instead of delivery.ack()
        if let Settled::Acked {
            outcome: Some(idem_runtime::CallOutcome::Replayed),
        } = settled
        {
            replayed += 1;
        }
    }
    report("with idem");
    println!(
        "\nwith idem: {replayed} duplicates acked as replays, without running the handler again."
    );
    for q in [
        "idem-example.coupons.before",
        "idem-example.coupons.after",
        glue.topology().dead_letter_queue(),
    ] {
        channel
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    conn.close(200, "bye".into()).await?;
    Ok(())
}
