//! In-flight duplicates on RabbitMQ: holding the delivery in process and trying the claim again,
//! against the glue's delay queue. One consumer (a sequential loop, prefetch 16) takes 200 orders
//! and 8 duplicates of a key another task holds for 2 s; measured: when the 200 other orders are
//! done, what one deferral costs the consumer, and how late the redelivery comes.
//!
//! `cargo bench -p idem-rabbitmq --bench in_flight` (RabbitMQ at AMQP_URL, default loopback).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_rabbitmq::{Glue, Settled};
use idem_runtime::ack::{Decision, Policy};
use idem_runtime::{MemoryStore, idempotent, observe};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[idempotent(key = "key", store = "store", scope = "bench.in_flight")]
async fn handle(
    store: &MemoryStore,
    key: u64,
    gate: Arc<tokio::sync::Notify>,
) -> Result<u64, idem_runtime::Error> {
    if key == HELD {
        gate.notified().await;
    }
    Ok(key)
}

const HELD: u64 = 1_000_000;
const OTHERS: u64 = 200;
const DUPS: usize = 8;
const HOLD: Duration = Duration::from_secs(2);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    println!(
        "| strategy | the 200 other orders done after | consumer time per deferral (median) | redelivery later than asked (median / max) | broker operations per deferral |"
    );
    println!("|---|---:|---:|---:|---|");
    for hold in [true, false] {
        let queue = format!("idem_bench_in_flight_{}", std::process::id());
        let glue = Glue::builder(&queue)
            .policy(Policy::default())
            .build(&conn)
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            glue.topology().queue_arguments(),
        )
        .await
        .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // Duplicates of the held key first, spread among the others.
        let mut keys: Vec<u64> = (0..OTHERS).collect();
        for i in 0..DUPS {
            keys.insert(i * 25, HELD);
        }
        for k in &keys {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &k.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        ch.basic_qos(16, BasicQosOptions::default()).await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let store = MemoryStore::new();
        let gate = Arc::new(tokio::sync::Notify::new());
        let holder = {
            let (store, gate) = (store.clone(), gate.clone());
            tokio::spawn(async move { handle(&store, HELD, gate).await })
        };
        while store.is_empty() {
            tokio::task::yield_now().await;
        }
        let release = {
            let gate = gate.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HOLD).await;
                gate.notify_one();
            })
        };
        let start = Instant::now();
        let (mut done_others, mut others_at, mut dups_done) = (0, Duration::ZERO, 0);
        let (mut costs, mut late) = (Vec::new(), Vec::new());
        let mut asked: std::collections::HashMap<u64, (Instant, Duration)> = Default::default();
        let mut copy_id = 0u64;
        while dups_done < DUPS || done_others < OTHERS {
            let d = consumer.next().await.unwrap().unwrap();
            let key = u64::from_be_bytes(d.data[..8].try_into().unwrap());
            if let Some(tag) = d.properties.correlation_id().as_ref() {
                let (t, after) = asked.remove(&tag.as_str().parse().unwrap()).unwrap();
                late.push((t.elapsed().as_secs_f64() - after.as_secs_f64()) * 1e3);
            }
            if hold {
                // Hold the delivery, sleep out the policy's pause, claim again; then ack.
                let mut deferrals = 0;
                loop {
                    let (_, report) = observe(handle(&store, key, gate.clone())).await;
                    match Policy::default().decide(report.map(|r| r.outcome), true, 1, deferrals) {
                        Decision::Retry { after, .. } => {
                            let t = Instant::now();
                            tokio::time::sleep(after).await;
                            late.push((t.elapsed().as_secs_f64() - after.as_secs_f64()) * 1e3);
                            deferrals += 1;
                        }
                        _ => break,
                    }
                }
                d.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                // The glue; the copy is tagged (correlation id) to time its return.
                let mut d = d;
                copy_id += 1;
                let props = d
                    .properties
                    .clone()
                    .with_correlation_id(copy_id.to_string().as_str().into());
                d.properties = props;
                let t = Instant::now();
                let s = glue
                    .settle(&d, handle(&store, key, gate.clone()))
                    .await
                    .unwrap();
                if let Settled::Redelivered { after, .. } = s {
                    costs.push(t.elapsed().as_secs_f64() * 1e6);
                    let (_, ttl) = glue.topology().delay_queue(after);
                    asked.insert(copy_id, (Instant::now(), ttl));
                    continue;
                }
            }
            if key == HELD {
                dups_done += 1;
            } else {
                done_others += 1;
                if done_others == OTHERS {
                    others_at = start.elapsed();
                }
            }
        }
        holder.await.unwrap().unwrap();
        release.await.unwrap();
        let (lm, lx) = (
            median(&mut late.clone()),
            late.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "| {} | {:.2} s | {} | {lm:.1} ms / {lx:.1} ms | {} |",
            if hold {
                "hold the delivery, sleep, claim again"
            } else {
                "delay queue (the glue)"
            },
            others_at.as_secs_f64(),
            if hold {
                "the whole pause (the loop waits)".to_owned()
            } else {
                format!("{:.0} µs", median(&mut costs))
            },
            if hold {
                "none (one prefetch slot held)"
            } else {
                "1 confirmed publish + 1 ack"
            },
        );
        let _ = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        for k in 0..=22 {
            let (q, _) = glue.topology().delay_queue(Duration::from_millis(1 << k));
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .queue_delete(
                glue.topology().dead_letter_queue().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
}
