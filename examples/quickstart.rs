//! The articles' story: "order paid" messages arrive more than once, and each order must get its
//! coupon exactly once, across a crash and restart of the consumer.
//!
//! A small broker delivers at least once, with the duplicates the articles list: a producer retry
//! (same order, new message id), a redelivery after a consumer restart (coupon issued, ack lost),
//! and duplicates racing a slow handler. Four consumers take deliveries at once. A message not
//! acked when the process dies is redelivered when it starts again; two processes started at once
//! on the same file both deliver the whole stream (like two consumers after a rebalance).
//!
//! Everything lives in one SQLite file, the embedded default store: no server needed.
//!
//! ```text
//! cargo run --example quickstart                        # the whole stream
//! cargo run --example quickstart -- --crash-after 6     # dies half-way, like kill -9 ...
//! cargo run --example quickstart                        # ... and resumes: redeliveries replayed
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_runtime::sqlx::{self, Row, Sqlite, SqlitePool, Transaction};
use idem_runtime::{SqliteStore, idempotent};
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The handler: one line of idem on an ordinary sqlx handler.
///
/// The coupon row is written in the caller's transaction, and so is the order's done mark: they
/// commit together or not at all (the caller commits). Kill the process at any moment, even
/// between the insert and the commit, and the redelivery still issues exactly one coupon. The
/// `coupons` table has no unique key: only idem stands between a duplicate and a second coupon.
#[idempotent(
    key = "order_id",
    ttl = "3s",
    tx = "tx",
    scope = "quickstart.issue_coupon"
)]
async fn issue_coupon(
    tx: &mut Transaction<'_, Sqlite>,
    order_id: i64,
    user: &str,
    delivery: i64,
    slow: bool,
) -> Result<String, AppError> {
    if slow {
        // A handler that takes a while (a call to the coupon service, say).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let code = format!("COUPON-{order_id}-{user}");
    sqlx::query("INSERT INTO coupons (order_id, code, delivery) VALUES (?, ?, ?)")
        .bind(order_id)
        .bind(&code)
        .bind(delivery)
        .execute(&mut **tx)
        .await?;
    Ok(code)
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

    // The embedded default store: one SQLite file, created and migrated on first use, installed
    // once for every #[idempotent] fn of the process.
    let store = SqliteStore::open(&path).await?;
    let db = store.pool().clone();
    idem_runtime::install_default_store(store)?;

    let (run, nth) = set_up(&db).await?;
    // The broker: every message not yet acked is (re)delivered.
    let unacked: Vec<Delivery> =
        sqlx::query("SELECT msg_id, order_id, lose_ack FROM queue WHERE acked = 0 ORDER BY msg_id")
            .fetch_all(&db)
            .await?
            .iter()
            .map(|r| {
                let msg_id: i64 = r.get(0);
                let m = STREAM
                    .iter()
                    .find(|m| m.0 == msg_id)
                    .expect("a message of the stream");
                Delivery {
                    msg_id,
                    order_id: r.get(1),
                    user: m.2,
                    slow: m.4,
                    lose_ack: r.get::<i64, _>(2) == 1,
                }
            })
            .collect();
    if nth > 1 {
        println!(
            "run {nth} of this stream: the broker redelivers the {} messages that were never acked\n",
            unacked.len()
        );
    }

    let queue = Arc::new(Mutex::new(std::collections::VecDeque::from(unacked)));
    let handled = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (queue, db, handled) = (queue.clone(), db.clone(), handled.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                let Some(d) = queue.lock().await.pop_front() else {
                    return Ok::<_, AppError>(());
                };
                match consume(&db, run, d).await? {
                    Consumed::Handled => {
                        if crash_after == Some(handled.fetch_add(1, Ordering::SeqCst) + 1) {
                            println!(
                                "** crash: the process dies (abort, like kill -9) after its delivery number {} (message {}), before acking it **",
                                handled.load(Ordering::SeqCst),
                                d.msg_id
                            );
                            std::process::abort();
                        }
                        if d.lose_ack {
                            // The coupon was issued, the ack never reached the broker: redelivered.
                            sqlx::query("UPDATE queue SET lose_ack = 0 WHERE msg_id = ?")
                                .bind(d.msg_id)
                                .execute(&db)
                                .await?;
                            queue.lock().await.push_back(Delivery { lose_ack: false, ..d });
                            continue;
                        }
                        sqlx::query("UPDATE queue SET acked = 1 WHERE msg_id = ?")
                            .bind(d.msg_id)
                            .execute(&db)
                            .await?;
                    }
                    Consumed::Later => {
                        // Never acked: redelivered later, as RocketMQ's RECONSUME_LATER does.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        queue.lock().await.push_back(d);
                    }
                }
            }
        }));
    }
    for c in consumers {
        c.await??;
    }
    report(&db, run, nth).await
}

enum Consumed {
    /// Issued, or replayed: ack it.
    Handled,
    /// In flight elsewhere: redeliver later, never ack.
    Later,
}

/// One delivery, as a consumer with idem handles it: begin a transaction, call the handler,
/// commit. Every delivery is recorded, to count them in the report.
async fn consume(db: &SqlitePool, run: i64, d: Delivery) -> Result<Consumed, AppError> {
    static DELIVERIES: AtomicUsize = AtomicUsize::new(0);
    let delivery = run * 1_000_000 + DELIVERIES.fetch_add(1, Ordering::Relaxed) as i64;
    let mut tx = db.begin().await?;
    let outcome = match issue_coupon(&mut tx, d.order_id, d.user, delivery, d.slow).await {
        Ok(_code) => Consumed::Handled,
        Err(AppError::Idem(idem_runtime::Error::InFlight { .. })) => Consumed::Later,
        Err(e) => return Err(e),
    };
    tx.commit().await?;
    // Issued by this delivery if its coupon row is there; otherwise it was a replay.
    let label = match outcome {
        Consumed::Later => "deferred",
        Consumed::Handled => {
            let issued: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons WHERE delivery = ?")
                .bind(delivery)
                .fetch_one(db)
                .await?;
            if issued > 0 { "issued" } else { "replayed" }
        }
    };
    sqlx::query("INSERT INTO deliveries (run, msg_id, order_id, outcome) VALUES (?, ?, ?, ?)")
        .bind(run)
        .bind(d.msg_id)
        .bind(d.order_id)
        .bind(label)
        .execute(db)
        .await?;
    Ok(outcome)
}

/// Create the tables, and seed the stream when there is none or the last one was finished. One
/// process at a time (the write lock): two started at once share one stream.
async fn set_up(db: &SqlitePool) -> Result<(i64, i64), sqlx::Error> {
    let mut tx = db.begin_with("BEGIN IMMEDIATE").await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS coupons (order_id INTEGER NOT NULL, code TEXT NOT NULL, delivery INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS queue (msg_id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL, lose_ack INTEGER NOT NULL, acked INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS deliveries (run INTEGER, msg_id INTEGER, order_id INTEGER, outcome TEXT)",
        "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT)",
    ] {
        sqlx::query(ddl).execute(&mut *tx).await?;
    }
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM queue WHERE acked = 0")
        .fetch_one(&mut *tx)
        .await?;
    if open == 0 {
        // No stream, or the last one is done: start the story over.
        for sql in [
            "DELETE FROM coupons",
            "DELETE FROM queue",
            "DELETE FROM deliveries",
            "DELETE FROM runs",
            "DELETE FROM idem_keys",
        ] {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        for &(msg_id, order_id, _, _, _, lose_ack) in STREAM {
            sqlx::query("INSERT INTO queue VALUES (?, ?, ?, 0)")
                .bind(msg_id)
                .bind(order_id)
                .bind(i64::from(lose_ack))
                .execute(&mut *tx)
                .await?;
        }
    }
    let run: i64 =
        sqlx::query_scalar("INSERT INTO runs (started) VALUES (datetime('now')) RETURNING id")
            .fetch_one(&mut *tx)
            .await?;
    let nth: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((run, nth))
}

/// The table, from what the database recorded over every run of this story: read in one
/// transaction, a snapshot, so another quick start on the same file that starts a new story
/// meanwhile does not change it.
async fn report(db: &SqlitePool, run: i64, nth: i64) -> Result<(), Box<dyn std::error::Error>> {
    let mut snapshot = db.begin().await?;
    let ours: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = ?")
        .bind(run)
        .fetch_one(&mut *snapshot)
        .await?;
    if ours == 0 {
        // This story was finished; a second quick start, started after, began a new one.
        println!(
            "every message acked; another quick start on this file has since begun a new stream."
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<46} {:>10} {:>8} {:>9} {:>8}",
        "order", "what happened", "deliveries", "replayed", "later run", "coupons"
    );
    let rule = "-".repeat(92);
    println!("{rule}");
    let (mut deliveries_total, mut coupons_total, mut replayed_total, mut restart_total) =
        (0, 0, 0, 0);
    let stories: Vec<_> = STREAM.iter().filter(|m| !m.3.is_empty()).collect();
    for &&(_, order, _, story, _, _) in &stories {
        let mut count = async |sql: &'static str| {
            let n: i64 = sqlx::query(sql)
                .bind(order)
                .fetch_one(&mut *snapshot)
                .await?
                .get(0);
            Ok::<i64, sqlx::Error>(n)
        };
        // Deliveries that the handler answered (issued or replayed); a deferral is not one.
        let deliveries = count(
            "SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome IN ('issued', 'replayed')",
        )
        .await?;
        let replayed =
            count("SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome = 'replayed'")
                .await?;
        let restart = count(
            "SELECT count(*) FROM deliveries WHERE order_id = ? AND outcome = 'replayed' AND run > (SELECT min(id) FROM runs)",
        )
        .await?;
        let coupons = count("SELECT count(*) FROM coupons WHERE order_id = ?").await?;
        deliveries_total += deliveries;
        coupons_total += coupons;
        replayed_total += replayed;
        restart_total += restart;
        println!("{order:<6} {story:<46} {deliveries:>10} {replayed:>8} {restart:>9} {coupons:>8}");
        if coupons != 1 {
            return Err(format!("order {order} got {coupons} coupons").into());
        }
    }
    println!("{rule}");
    println!(
        "{deliveries_total} deliveries of {} orders: {coupons_total} coupons issued, {replayed_total} duplicates replayed.",
        stories.len()
    );
    println!("replayed: answered from the order's done mark, without running the handler again.");
    if nth > 1 {
        println!(
            "later run: {restart_total} of them in a later run of this stream (after a restart, or in a second process), from the records on disk."
        );
    }
    Ok(())
}
