//! The articles' story: "order paid" messages arrive more than once, and each order must get its
//! coupon exactly once.
//!
//! A tiny in-process broker delivers at least once, with the duplicates the articles list:
//! an upstream retry (same order, new message id), a redelivery after a consumer restart (coupon
//! issued, ack lost), and duplicates racing a slow handler. Four consumers take deliveries at the
//! same time; a delivery that finds its order in flight is redelivered later, as RocketMQ's
//! RECONSUME_LATER does. Runs on the embedded default store: no server needed.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{MemoryStore, idempotent};
use tokio::sync::{Notify, mpsc};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

/// What the business keeps: coupons issued per order. The effect we must not repeat.
static COUPONS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

/// The handler, as a user writes it: one attribute, signature unchanged.
#[idempotent(key = "order_id", ttl = "10s")]
async fn issue_coupon(order_id: u64, user: &str, slow: bool) -> Result<String, AppError> {
    if slow {
        // A handler that takes a while (a call to the coupon service, say).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    *COUPONS.lock().unwrap().entry(order_id).or_default() += 1;
    Ok(format!("COUPON-{order_id}-{user}"))
}

#[derive(Debug, Clone)]
struct Delivery {
    msg_id: u32,
    order_id: u64,
    user: &'static str,
    slow: bool,
    /// Simulates a consumer that issues the coupon, then restarts before it acks.
    crash_before_ack: bool,
}

#[derive(Default, Clone)]
struct Row {
    story: &'static str,
    deliveries: u32,
    deferred: u32,
    acked: u32,
}

#[tokio::main]
async fn main() {
    idem_runtime::install_default_store(MemoryStore::new()).expect("installed once");

    let stories: [(u64, &str, &str); 5] = [
        (1001, "ann", "delivered once"),
        (1002, "bob", "producer retry: re-sent with a new message id"),
        (1003, "cat", "consumer restarted before ack: redelivered"),
        (1004, "dan", "3 duplicates race a slow handler"),
        (1005, "eve", "upstream payment retry, twice"),
    ];
    let mut report: BTreeMap<u64, Row> = BTreeMap::new();
    let mut initial = Vec::new();
    let mut msg_id = 0;
    let mut deliver = |order_id, user, slow, crash_before_ack| {
        msg_id += 1;
        Delivery {
            msg_id,
            order_id,
            user,
            slow,
            crash_before_ack,
        }
    };
    for (order, user, story) in stories {
        report.insert(
            order,
            Row {
                story,
                ..Row::default()
            },
        );
        match order {
            1001 => initial.push(deliver(order, user, false, false)),
            1002 => {
                initial.push(deliver(order, user, false, false));
                initial.push(deliver(order, user, false, false));
            }
            1003 => initial.push(deliver(order, user, false, true)),
            1004 => {
                for _ in 0..4 {
                    initial.push(deliver(order, user, true, false));
                }
            }
            _ => {
                for _ in 0..3 {
                    initial.push(deliver(order, user, false, false));
                }
            }
        }
    }

    // The broker: a queue, four consumers, redelivery on failure or missing ack.
    let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let report = Arc::new(Mutex::new(report));
    let done = Arc::new(Notify::new());
    // Messages still in the system (queued, being handled, or waiting for redelivery).
    let pending = Arc::new(AtomicUsize::new(initial.len()));
    for d in initial {
        tx.send(d).unwrap();
    }
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (rx, tx, report, done, pending) = (
            rx.clone(),
            tx.clone(),
            report.clone(),
            done.clone(),
            pending.clone(),
        );
        consumers.push(tokio::spawn(async move {
            loop {
                let Some(d) = rx.lock().await.recv().await else {
                    return;
                };
                let result = issue_coupon(d.order_id, d.user, d.slow).await;
                let mut report = report.lock().unwrap();
                let row = report.get_mut(&d.order_id).unwrap();
                row.deliveries += 1;
                match result {
                    Ok(_coupon) if d.crash_before_ack => {
                        // The coupon was issued, the ack never reached the broker: redelivered.
                        tx.send(Delivery {
                            crash_before_ack: false,
                            msg_id: d.msg_id,
                            ..d
                        })
                        .unwrap();
                    }
                    Ok(_coupon) => {
                        row.acked += 1;
                        if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                            done.notify_one();
                        }
                    }
                    Err(AppError::Idem(idem_runtime::Error::InFlight { retry_after, .. })) => {
                        // Never ack an in-flight duplicate: the first attempt may still fail.
                        row.deferred += 1;
                        let tx = tx.clone();
                        let later = retry_after.min(Duration::from_millis(100));
                        tokio::spawn(async move {
                            tokio::time::sleep(later).await;
                            let _ = tx.send(d);
                        });
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    done.notified().await;
    for c in &consumers {
        c.abort();
    }

    let report = report.lock().unwrap();
    let coupons = COUPONS.lock().unwrap();
    println!(
        "{:<6} {:<48} {:>10} {:>9} {:>8}",
        "order", "what happened", "deliveries", "deferred", "coupons"
    );
    println!("{}", "-".repeat(85));
    let (mut total_deliveries, mut total_coupons) = (0, 0);
    for (order, row) in report.iter() {
        let issued = coupons.get(order).copied().unwrap_or(0);
        total_deliveries += row.deliveries;
        total_coupons += issued;
        println!(
            "{order:<6} {:<48} {:>10} {:>9} {:>8}",
            row.story, row.deliveries, row.deferred, issued
        );
    }
    println!("{}", "-".repeat(85));
    println!(
        "{total_deliveries} deliveries of {} orders: {total_coupons} coupons issued, {} duplicates suppressed.",
        report.len(),
        total_deliveries - total_coupons
    );
    assert!(
        coupons.values().all(|&n| n == 1),
        "a coupon was issued twice"
    );
    assert_eq!(coupons.len(), report.len(), "an order got no coupon");
}
