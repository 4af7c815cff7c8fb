//! In-flight duplicates on JetStream: holding the message in-process (what `Glue::settle`
//! does: `+WPI` while it waits, the claim tried again after the policy's pause) against a
//! delayed redelivery (`-NAK {"delay": ...}` with the same pauses). A holder runs a 2 s handler
//! on one key; 4 duplicates of it and 40 other orders are then consumed by one sequential loop.
//!
//! ```sh
//! cargo bench -p idem-nats --bench in_flight   # NATS_URL, REDIS_URL
//! ```

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::ack::{Decision, Policy};
use idem_runtime::{RedisStore, idempotent, observe};

const HOLDER: Duration = Duration::from_secs(2);
const DUPLICATES: usize = 4;
const OTHERS: usize = 40;

#[idempotent(
    key = "id",
    store = "store",
    scope = "bench.nats.in_flight",
    ttl = "10s"
)]
async fn handle(store: &RedisStore, id: i64, pause: Duration) -> Result<i64, idem_runtime::Error> {
    tokio::time::sleep(pause).await;
    Ok(id)
}

#[derive(Debug, Default)]
struct Measured {
    acked: usize,
    max_deliveries: i64,
    deliveries: i64,
    latency_after_holder: Duration,
    others_while_holder_ran: usize,
    lost: usize,
}

async fn one(
    js: &jetstream::Context,
    redis: &RedisStore,
    strategy: &str,
    max_deliver: i64,
) -> Measured {
    let name = format!("BENCH_INFLIGHT_{}", strategy.to_uppercase());
    let _ = js.delete_stream(&name).await;
    let subject = format!("bench.inflight.{strategy}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("c".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(5),
            max_deliver,
            ..Default::default()
        })
        .await
        .unwrap();
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let key = base;
    // The holder: the first delivery, already in its handler.
    let holder = {
        let redis = redis.clone();
        tokio::spawn(async move {
            handle(&redis, key, HOLDER).await.unwrap();
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await; // the holder has claimed the key
    for _ in 0..DUPLICATES {
        js.publish(subject.clone(), key.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for i in 0..OTHERS {
        js.publish(subject.clone(), (base + 1 + i as i64).to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let glue = Glue::new(&consumer);
    let policy = Policy::default();
    let mut m = Measured::default();
    let mut messages = consumer
        .stream()
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let started = Instant::now();
    let mut last_dup_ack = started;
    let mut handled_others = Vec::new();
    let mut done = 0;
    while done < DUPLICATES + OTHERS {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(8), messages.next()).await
        else {
            break; // nothing more comes: what is left was lost
        };
        let id: i64 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
        let delivered = msg.info().unwrap().delivered;
        if id == key {
            m.deliveries += 1;
            m.max_deliveries = m.max_deliveries.max(delivered);
        }
        let acked = if strategy == "hold" {
            matches!(
                glue.settle(msg, || handle(redis, id, Duration::ZERO))
                    .await
                    .unwrap(),
                Settled::Acked { .. }
            )
        } else {
            // The alternative: -NAK with the policy's in-flight pause, the broker redelivering.
            let (_, report) = observe(handle(redis, id, Duration::ZERO)).await;
            let deferrals = u32::try_from(delivered - 1).unwrap();
            match policy.decide(report.map(|r| r.outcome), true, 1, deferrals) {
                Decision::Ack => {
                    msg.ack().await.unwrap();
                    true
                }
                Decision::Retry { after, .. } => {
                    msg.ack_with(AckKind::Nak(Some(after))).await.unwrap();
                    false
                }
                other => panic!("{other:?}"),
            }
        };
        if acked {
            done += 1;
            if id == key {
                m.acked += 1;
                last_dup_ack = Instant::now();
            } else {
                handled_others.push(Instant::now());
            }
        }
    }
    let holder_done = holder.await.unwrap();
    m.lost = DUPLICATES - m.acked;
    m.latency_after_holder = last_dup_ack.saturating_duration_since(holder_done);
    m.others_while_holder_ran = handled_others.iter().filter(|t| **t < holder_done).count();
    let _ = js.delete_stream(&name).await;
    m
}

#[tokio::main]
async fn main() {
    let js = jetstream::new(
        async_nats::connect(std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into()))
            .await
            .unwrap(),
    );
    let redis = RedisStore::from_url(
        &std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    )
    .await
    .unwrap();
    println!(
        "| strategy | max_deliver | duplicates acked | lost | deliveries of the {DUPLICATES} duplicates | most deliveries of one | last duplicate acked after the holder | other orders handled while the holder ran (of {OTHERS}) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (strategy, max_deliver) in [("hold", 5), ("nak", 5), ("hold", -1), ("nak", -1)] {
        let m = one(&js, &redis, strategy, max_deliver).await;
        println!(
            "| {strategy} | {} | {} | {} | {} | {} | {:?} | {} |",
            if max_deliver < 0 {
                "unlimited".to_owned()
            } else {
                max_deliver.to_string()
            },
            m.acked,
            m.lost,
            m.deliveries,
            m.max_deliveries,
            m.latency_after_holder,
            m.others_while_holder_ran
        );
    }
}
