//! The articles' story: "order paid" messages arrive more than once, and each order must get its
//! coupon exactly once, across a crash and restart of the consumer.
//!
//! A small broker delivers at least once, with the duplicates the articles list: a producer retry
//! (same order, new message id), a redelivery after a consumer restart (coupon issued, ack lost),
//! and duplicates racing a slow handler. Four consumers take deliveries at once; a delivery that
//! finds its order in flight is redelivered later, as RocketMQ's RECONSUME_LATER does. A message
//! not acked when the process dies is redelivered when it starts again.
//!
//! Everything lives in one SQLite file, the embedded default store: no server needed.
//!
//! ```text
//! cargo run --example quickstart                        # the whole stream
//! cargo run --example quickstart -- --crash-after 6     # dies half-way, like kill -9 ...
//! cargo run --example quickstart                        # ... and resumes: redeliveries suppressed
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idem_runtime::sqlx::{self, Row, SqlitePool};
use idem_runtime::{Call, Options, SqliteStore};
use tokio::sync::{Notify, mpsc};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// How long a holder that crashed mid-handler blocks its order (the lease is renewed while a live
/// handler runs, however slow).
const COUPONS: Options = Options::new("quickstart::issue_coupon").ttl(Duration::from_secs(3));

/// The handler. The effect is a row in `coupons`, which has no unique key: only idem stands
/// between a duplicate and a second coupon.
///
/// It runs in idem's transactional mode: the coupon row and the order's done mark are written in
/// one SQLite transaction, so they commit together or not at all. Kill the process at any moment,
/// even between the insert and the mark, and the redelivery still issues exactly one coupon. (With
/// `#[idempotent]`, as on the README's first page, the mark is written after the handler: a crash
/// in between would let the redelivery run it again. That is the right tool when the effect is not
/// in this database.)
async fn issue_coupon(
    store: &SqliteStore,
    order_id: i64,
    user: &'static str,
    slow: bool,
    ran: Arc<AtomicBool>,
) -> Result<String, AppError> {
    store
        .run_in_tx(&COUPONS, Call::new(&order_id), move |tx| {
            Box::pin(async move {
                ran.store(true, Ordering::SeqCst);
                if slow {
                    // A handler that takes a while (a call to the coupon service, say).
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let code = format!("COUPON-{order_id}-{user}");
                sqlx::query("INSERT INTO coupons (order_id, code) VALUES (?, ?)")
                    .bind(order_id)
                    .bind(&code)
                    .execute(&mut **tx)
                    .await?;
                Ok(code)
            })
        })
        .await
}

/// The stream the producer sent: (message id, order, user, story, slow handler, ack lost).
const STREAM: &[(i64, i64, &str, &str, bool, bool)] = &[
    (1, 1001, "ann", "delivered once", false, false),
    (
        2,
        1002,
        "bob",
        "producer retry: re-sent with a new message id",
        false,
        false,
    ),
    (3, 1002, "bob", "", false, false),
    (
        4,
        1003,
        "cat",
        "consumer restarted before ack: redelivered",
        false,
        true,
    ),
    (
        5,
        1004,
        "dan",
        "3 duplicates race a slow handler",
        true,
        false,
    ),
    (6, 1004, "dan", "", true, false),
    (7, 1004, "dan", "", true, false),
    (8, 1004, "dan", "", true, false),
    (
        9,
        1005,
        "eve",
        "upstream payment retry, twice",
        false,
        false,
    ),
    (10, 1005, "eve", "", false, false),
    (11, 1005, "eve", "", false, false),
    (12, 1006, "fay", "delivered once", false, false),
    (13, 1007, "gus", "producer retry", false, false),
    (14, 1007, "gus", "", false, false),
    (15, 1008, "hal", "delivered once", false, false),
];

#[derive(Debug, Clone, Copy)]
struct Delivery {
    msg_id: i64,
    order_id: i64,
    user: &'static str,
    slow: bool,
    lose_ack: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let crash_after: Option<usize> = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => None,
        [flag, n] if flag == "--crash-after" => Some(n.parse()?),
        _ => return Err("usage: quickstart [--crash-after N]".into()),
    };
    let path = std::env::var("IDEM_QUICKSTART_DB")
        .unwrap_or_else(|_| "target/idem-quickstart.sqlite".into());
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)?;
    }

    // The embedded default store: one SQLite file, created and migrated on first use.
    let store = SqliteStore::open(&path).await?;
    let db = store.pool().clone();

    for ddl in [
        "CREATE TABLE IF NOT EXISTS coupons (order_id INTEGER NOT NULL, code TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS acked (msg_id INTEGER PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS deliveries (run INTEGER, msg_id INTEGER, order_id INTEGER, outcome TEXT)",
    ] {
        sqlx::query(ddl).execute(&db).await?;
    }
    let acked: i64 = sqlx::query("SELECT count(*) FROM acked")
        .fetch_one(&db)
        .await?
        .get(0);
    if acked as usize == STREAM.len() {
        // The previous run finished: start the story over.
        for sql in [
            "DELETE FROM coupons",
            "DELETE FROM acked",
            "DELETE FROM deliveries",
            "DELETE FROM idem_keys",
        ] {
            sqlx::query(sql).execute(&db).await?;
        }
    }
    let run: i64 = sqlx::query("SELECT coalesce(max(run), 0) + 1 FROM deliveries")
        .fetch_one(&db)
        .await?
        .get(0);

    // The broker: every message not yet acked is (re)delivered.
    let unacked: Vec<Delivery> = {
        let done: Vec<i64> = sqlx::query("SELECT msg_id FROM acked")
            .fetch_all(&db)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        STREAM
            .iter()
            .filter(|m| !done.contains(&m.0))
            .map(|&(msg_id, order_id, user, _, slow, lose_ack)| Delivery {
                msg_id,
                order_id,
                user,
                slow,
                lose_ack,
            })
            .collect()
    };
    if run > 1 {
        println!(
            "run {run}: restarted after a crash; the broker redelivers the {} messages that were never acked\n",
            unacked.len()
        );
    }
    let (tx, rx) = mpsc::unbounded_channel::<Delivery>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let done = Arc::new(Notify::new());
    // Messages still in the system (queued, being handled, or waiting for redelivery).
    let pending = Arc::new(AtomicUsize::new(unacked.len()));
    let handled_ok = Arc::new(AtomicUsize::new(0));
    for d in &unacked {
        tx.send(*d)?;
    }
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (rx, tx, db, store, done, pending, handled_ok) = (
            rx.clone(),
            tx.clone(),
            db.clone(),
            store.clone(),
            done.clone(),
            pending.clone(),
            handled_ok.clone(),
        );
        consumers.push(tokio::spawn(async move {
            loop {
                let Some(d) = rx.lock().await.recv().await else { return };
                let ran = Arc::new(AtomicBool::new(false));
                let result = issue_coupon(&store, d.order_id, d.user, d.slow, ran.clone()).await;
                let outcome = match &result {
                    Ok(_) if ran.load(Ordering::SeqCst) => "issued",
                    Ok(_) => "replayed",
                    Err(AppError::Idem(idem_runtime::Error::InFlight { .. })) => "deferred",
                    Err(e) => panic!("unexpected error: {e}"),
                };
                sqlx::query("INSERT INTO deliveries VALUES (?, ?, ?, ?)")
                    .bind(run).bind(d.msg_id).bind(d.order_id).bind(outcome)
                    .execute(&db).await.unwrap();
                match result {
                    Ok(_) => {
                        if crash_after == Some(handled_ok.fetch_add(1, Ordering::SeqCst) + 1) {
                            println!("** crash: the process dies (abort, like kill -9) after handling message {}, before acking it **", d.msg_id);
                            std::process::abort();
                        }
                        if d.lose_ack {
                            // The coupon was issued, the ack never reached the broker: redelivered.
                            tx.send(Delivery { lose_ack: false, ..d }).unwrap();
                            continue;
                        }
                        sqlx::query("INSERT INTO acked VALUES (?)").bind(d.msg_id).execute(&db).await.unwrap();
                        if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                            done.notify_one();
                        }
                    }
                    Err(AppError::Idem(idem_runtime::Error::InFlight { retry_after, .. })) => {
                        // Never ack an in-flight duplicate: the first attempt may still fail.
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(retry_after.min(Duration::from_millis(250))).await;
                            let _ = tx.send(d);
                        });
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    if !unacked.is_empty() {
        done.notified().await;
    }
    for c in &consumers {
        c.abort();
    }
    report(&db, run).await
}

/// The table, from what the database recorded over every run of this story.
async fn report(db: &SqlitePool, run: i64) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{:<6} {:<46} {:>10} {:>8} {:>8} {:>8} {:>8}",
        "order", "what happened", "deliveries", "deferred", "replayed", "restart", "coupons"
    );
    let rule = "-".repeat(100);
    println!("{rule}");
    let (mut total_deliveries, mut total_coupons, mut total_restart) = (0, 0, 0);
    let stories: Vec<_> = STREAM.iter().filter(|m| !m.3.is_empty()).collect();
    for &&(_, order, _, story, _, _) in &stories {
        let count = |sql: &'static str| async move {
            let n: i64 = sqlx::query(sql).bind(order).fetch_one(db).await?.get(0);
            Ok::<i64, sqlx::Error>(n)
        };
        let deliveries = count("SELECT count(*) FROM deliveries WHERE order_id = ?").await?;
        let deferred =
            count("SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome = 'deferred'")
                .await?;
        let replayed =
            count("SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome = 'replayed'")
                .await?;
        let restart = count(
            "SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome = 'replayed' AND run > 1",
        )
        .await?;
        let coupons = count("SELECT count(*) FROM coupons WHERE order_id = ?").await?;
        total_deliveries += deliveries;
        total_coupons += coupons;
        total_restart += restart;
        println!(
            "{order:<6} {story:<46} {deliveries:>10} {deferred:>8} {replayed:>8} {restart:>8} {coupons:>8}"
        );
        assert_eq!(coupons, 1, "order {order} got {coupons} coupons");
    }
    println!("{rule}");
    println!(
        "{total_deliveries} deliveries of {} orders: {total_coupons} coupons issued, {} duplicates suppressed.",
        stories.len(),
        total_deliveries - total_coupons
    );
    println!(
        "deferred: found the order in flight, redelivered later (never acked). replayed: answered from the record."
    );
    if run > 1 {
        println!(
            "restart: {total_restart} replays came after the process restarted, from the record on disk."
        );
    }
    Ok(())
}
