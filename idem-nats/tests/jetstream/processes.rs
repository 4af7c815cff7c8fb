//! Several consumer processes on one durable consumer: SIGKILLed at random and restarted
//! (scenario 2), and duplicates arriving while the first is handled (scenario 3). The workers
//! are this test binary run again (`worker_process`); they write what they receive to
//! PostgreSQL, where the parent counts.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::PgStore;
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool};

use crate::support::{self, ConsumerSettings, OrderPaid, Workers};

/// Run a worker process's role until it is killed (or, for `dups`, until its messages stop).
pub fn run_worker(role: &str, args: &[String]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = support::servers()
            .await
            .expect("the parent reached the servers");
        match role {
            "kill" => kill_worker(&s, args).await,
            "dups" => dups_worker(&s, args).await,
            other => panic!("unknown worker role {other}"),
        }
    });
}

/// The tables a worker writes: what it received (`receipts`), what it did (`events`).
async fn worker_tables(pool: &PgPool) -> (String, String) {
    let receipts = support::unique("nats_receipts");
    let events = support::unique("nats_events");
    support::exec(
        pool,
        format!("CREATE TABLE {receipts} (seq BIGINT NOT NULL, delivered INT NOT NULL, worker BIGINT NOT NULL)"),
    )
    .await;
    support::exec(
        pool,
        format!(
            "CREATE TABLE {events} (seq BIGINT NOT NULL, worker BIGINT NOT NULL, what TEXT NOT NULL, held INT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
        ),
    )
    .await;
    (receipts, events)
}

async fn receipt(
    pool: &PgPool,
    receipts: &str,
    msg: &async_nats::jetstream::Message,
    worker: i64,
) -> i64 {
    let info = msg.info().unwrap();
    let seq = info.stream_sequence as i64;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {receipts} (seq, delivered, worker) VALUES ($1, $2, $3)"
    )))
    .bind(seq)
    .bind(info.delivered as i32)
    .bind(worker)
    .execute(pool)
    .await
    .unwrap();
    seq
}

async fn event(pool: &PgPool, events: &str, seq: i64, worker: i64, what: &str, held: u32) {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {events} (seq, worker, what, held) VALUES ($1, $2, $3, $4)"
    )))
    .bind(seq)
    .bind(worker)
    .bind(what)
    .bind(held as i32)
    .execute(pool)
    .await
    .unwrap();
}

/// A pause of up to `max_ms`, different for each (message, delivery, worker).
fn pause(seed: u64, max_ms: u64) -> Duration {
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    Duration::from_millis(x % max_ms.max(1))
}

const KILL_ORDERS: usize = 150;
const KILL_COPIES: usize = 3;
const KILL_WORKERS: usize = 3;
const KILLS: usize = 40;

/// Scenario 2: Consumer processes SIGKILLed at random moments (before, inside and after the handler,
/// between its return and the commit, between the commit and the ack), restarted, until every
/// message is acked: with the transactional attribute, one effect per order, none missing,
/// nothing left unacked, and no message redelivered more than 10 times.
#[test]
fn consumers_killed_before_the_ack_replay_on_redelivery_and_apply_each_effect_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(s) = rt.block_on(support::servers()) else {
        return;
    };
    let settings = ConsumerSettings {
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    };
    let (orders, store, effects, receipts, events) = rt.block_on(async {
        let orders = support::orders(&s.js, settings).await;
        let store = support::pg_store(&s.pool).await;
        let effects = support::effects_table(&s.pool).await;
        let (receipts, events) = worker_tables(&s.pool).await;
        // Every order three times (each a producer retry with a new message id), shuffled.
        let mut stream: Vec<usize> = (0..KILL_ORDERS * KILL_COPIES)
            .map(|i| i % KILL_ORDERS)
            .collect();
        let mut seed = std::process::id() as u64 | 1;
        for i in (1..stream.len()).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            stream.swap(i, (seed >> 33) as usize % (i + 1));
        }
        for id in stream {
            orders
                .publish(
                    &s.js,
                    &OrderPaid {
                        id: id as i64,
                        user: 1,
                        amount: 100,
                    },
                )
                .await;
        }
        (orders, store, effects, receipts, events)
    });
    let args = |w: usize| {
        vec![
            orders.name.clone(),
            store.table().to_owned(),
            effects.clone(),
            receipts.clone(),
            events.clone(),
            w.to_string(),
        ]
    };
    let mut workers = Workers(
        (0..KILL_WORKERS)
            .map(|w| support::spawn_worker("kill", &args(w)))
            .collect(),
    );
    let started = Instant::now();
    let mut kills = 0;
    let mut x = std::process::id() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    loop {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Random moments between kills (the schedule, not a synchronisation).
        std::thread::sleep(Duration::from_millis(30 + (x >> 33) % 250));
        let state = rt.block_on(orders.state());
        if state.num_pending == 0 && state.num_ack_pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "still unacked: {state:?}"
        );
        if kills < KILLS {
            let victim = (x >> 40) as usize % KILL_WORKERS;
            workers.0[victim].kill().unwrap(); // SIGKILL
            workers.0[victim].wait().unwrap();
            kills += 1;
            workers.0[victim] = support::spawn_worker("kill", &args(victim + 10 * kills));
        }
    }
    drop(workers);
    rt.block_on(async {
        let per_order = support::effects_per_order(&s.pool, &effects).await;
        assert_eq!(per_order.len(), KILL_ORDERS, "an order has no effect");
        let doubled: Vec<_> = per_order.iter().filter(|(_, n)| *n != 1).collect();
        assert!(
            doubled.is_empty(),
            "orders with another number of effects than one: {doubled:?}"
        );
        let max_delivered = support::count(
            &s.pool,
            format!("SELECT COALESCE(max(delivered), 0)::BIGINT FROM {receipts}"),
        )
        .await;
        assert!(
            max_delivered <= 11,
            "a message was redelivered {} times",
            max_delivered - 1
        );
        let state = orders.state().await;
        assert_eq!((state.num_pending, state.num_ack_pending), (0, 0));
        assert!(orders.dead_letters(&s.js).await.is_empty());
        let tally = support::Tally {
            deliveries: support::count(&s.pool, format!("SELECT count(*) FROM {receipts}")).await
                as u64,
            effects: per_order.iter().map(|(_, n)| n).sum(),
            acks: (KILL_ORDERS * KILL_COPIES) as u64,
            redeliveries: support::count(
                &s.pool,
                format!("SELECT count(*) FROM {receipts} WHERE delivered > 1"),
            )
            .await as u64,
            dead_letters: 0,
            held: support::count(
                &s.pool,
                format!("SELECT COALESCE(sum(held), 0)::BIGINT FROM {events}"),
            )
            .await as u64,
        };
        println!(
            "{kills} SIGKILLs, max deliveries of one message {max_delivered}, {:?}",
            started.elapsed()
        );
        tally.print(
            &format!("2. {kills} SIGKILLs of {KILL_WORKERS} consumers"),
            "PostgreSQL (tx attribute)",
        );
        orders.delete(&s.js).await;
        support::drop_pg_store(&s.pool, &store).await;
        for t in [&effects, &receipts, &events] {
            support::exec(&s.pool, format!("DROP TABLE {t}")).await;
        }
    });
}

/// What the kill test's workers do with a message: the transactional handler, with pauses
/// between its return and the commit, and between the commit and the ack.
async fn kill_worker(s: &support::Servers, args: &[String]) {
    let (stream, table, effects, receipts, events) =
        (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let worker: i64 = args[5].parse().unwrap();
    let store = PgStore::with_table(s.pool.clone(), table).unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        s.js.get_stream(stream)
            .await
            .unwrap()
            .get_consumer("coupons")
            .await
            .unwrap();
    let glue = Glue::new(&consumer);
    let messages = consumer
        .stream()
        .max_messages_per_batch(4)
        .expires(Duration::from_secs(2))
        .heartbeat(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    messages
        .for_each_concurrent(4, |msg| async {
            let Ok(msg) = msg else { return }; // the parent deleted the stream
            let seq = receipt(&s.pool, receipts, &msg, worker).await;
            let seed = (seq as u64) << 20 ^ (support::delivered(&msg) as u64) << 8 ^ worker as u64;
            let payload = msg.payload.clone();
            let settled = glue
                .settle(msg, || {
                    let (store, payload) = (&store, payload.clone());
                    async move {
                        let order: OrderPaid = serde_json::from_slice(&payload)?;
                        let mut tx = store.pool().begin().await?;
                        let coupon =
                            crate::issue_coupon_tx(store, &mut tx, &order, effects, worker).await?;
                        tokio::time::sleep(pause(seed, 40)).await; // the handler returned, not committed
                        tx.commit().await?;
                        tokio::time::sleep(pause(seed ^ 0xff, 25)).await; // committed, not acked
                        Ok::<_, crate::AppError>(coupon)
                    }
                })
                .await
                .unwrap();
            let held = match settled {
                Settled::Acked { held, .. } => held,
                _ => 0,
            };
            event(&s.pool, events, seq, worker, settled.as_str(), held).await;
        })
        .await;
}

const DUPLICATES: usize = 4;
const DUP_WORKERS: usize = 3;

/// Scenario 3: Duplicates arriving while the first delivery is handled, across several consumer
/// processes: one effect; the duplicates are held (not acked while the holder runs, no delivery
/// spent) and then acked as replays, after the holder's commit.
#[test]
fn duplicates_while_the_first_is_handled_are_held_then_acked_as_replays() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(s) = rt.block_on(support::servers()) else {
        return;
    };
    let (orders, store, effects, receipts, events) = rt.block_on(async {
        let orders = support::orders(&s.js, ConsumerSettings::default()).await;
        let store = support::pg_store(&s.pool).await;
        let effects = support::effects_table(&s.pool).await;
        let (receipts, events) = worker_tables(&s.pool).await;
        (orders, store, effects, receipts, events)
    });
    let args = |w: usize| {
        vec![
            orders.name.clone(),
            store.table().to_owned(),
            effects.clone(),
            receipts.clone(),
            events.clone(),
            w.to_string(),
        ]
    };
    let _workers = Workers(
        (0..DUP_WORKERS)
            .map(|w| support::spawn_worker("dups", &args(w)))
            .collect(),
    );
    let order = OrderPaid {
        id: 4242,
        user: 3,
        amount: 100,
    };
    let wait_for = |sql: String, want: i64| {
        let started = Instant::now();
        while rt.block_on(support::count(&s.pool, sql.clone())) < want {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "timed out waiting for {sql}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    rt.block_on(orders.publish(&s.js, &order));
    // The first delivery is in its handler (which takes 2 s): now the duplicates arrive.
    wait_for(format!("SELECT count(*) FROM {receipts}"), 1);
    for _ in 0..DUPLICATES {
        rt.block_on(orders.publish(&s.js, &order));
    }
    // Every worker holds one while the holder has not committed: none is acked.
    wait_for(
        format!("SELECT count(*) FROM {receipts}"),
        DUP_WORKERS as i64,
    );
    let committed = rt.block_on(support::count(
        &s.pool,
        format!("SELECT count(*) FROM {events} WHERE what = 'committed'"),
    ));
    let state = rt.block_on(orders.state());
    if committed == 0 {
        assert_eq!(
            state.ack_floor.stream_sequence, 0,
            "a message was acked before the holder committed"
        );
    }
    wait_for(
        format!("SELECT count(*) FROM {events} WHERE what = 'acked'"),
        1 + DUPLICATES as i64,
    );
    rt.block_on(async {
        let state = orders.state().await;
        assert_eq!((state.num_pending, state.num_ack_pending, state.num_redelivered), (0, 0, 0));
        assert_eq!(support::count(&s.pool, format!("SELECT count(*) FROM {effects}")).await, 1);
        let rows: Vec<(i64, String, i32, bool)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT e.worker, e.what, e.held, e.at >= (SELECT min(at) FROM {events} WHERE what = 'committed') \
             FROM {events} e WHERE e.what LIKE 'acked%' OR e.what LIKE 'outcome%' ORDER BY e.at"
        )))
        .fetch_all(&s.pool)
        .await
        .unwrap();
        let outcomes: Vec<&str> = rows.iter().filter(|r| r.1.starts_with("outcome")).map(|r| r.1.as_str()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == "outcome executed").count(), 1, "{rows:?}");
        assert_eq!(outcomes.iter().filter(|o| **o == "outcome replayed").count(), DUPLICATES, "{rows:?}");
        assert!(rows.iter().all(|r| r.3), "a message was settled before the holder committed: {rows:?}");
        let held_elsewhere = rows.iter().filter(|r| r.1 == "acked" && r.2 > 0).map(|r| r.0).collect::<std::collections::BTreeSet<_>>();
        assert!(held_elsewhere.len() >= 2, "duplicates were held in fewer than two processes: {rows:?}");
        let max_delivered = support::count(&s.pool, format!("SELECT max(delivered)::BIGINT FROM {receipts}")).await;
        assert_eq!(max_delivered, 1, "a held duplicate cost a delivery");
        let tally = support::Tally {
            deliveries: support::count(&s.pool, format!("SELECT count(*) FROM {receipts}")).await as u64,
            effects: 1,
            acks: (1 + DUPLICATES) as u64,
            redeliveries: 0,
            dead_letters: 0,
            held: support::count(&s.pool, format!("SELECT sum(held)::BIGINT FROM {events}")).await as u64,
        };
        tally.print(&format!("3. {DUPLICATES} duplicates during a 2 s handler, {DUP_WORKERS} processes"), "PostgreSQL (tx attribute)");
        orders.delete(&s.js).await;
        support::drop_pg_store(&s.pool, &store).await;
        for t in [&effects, &receipts, &events] {
            support::exec(&s.pool, format!("DROP TABLE {t}")).await;
        }
    });
}

/// The duplicates test's workers: one message at a time, the handler taking 2 s before its
/// commit (the PostgreSQL claim holds the key until then).
async fn dups_worker(s: &support::Servers, args: &[String]) {
    let (stream, table, effects, receipts, events) =
        (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let worker: i64 = args[5].parse().unwrap();
    let store = PgStore::with_table(s.pool.clone(), table).unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer =
        s.js.get_stream(stream)
            .await
            .unwrap()
            .get_consumer("coupons")
            .await
            .unwrap();
    let glue = Glue::new(&consumer);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1)
        .messages()
        .await
        .unwrap();
    // Until the parent deletes the stream.
    while let Some(Ok(msg)) = messages.next().await {
        let seq = receipt(&s.pool, receipts, &msg, worker).await;
        let payload = msg.payload.clone();
        let settled = glue
            .settle(msg, || {
                let (store, payload, pool) = (&store, payload.clone(), &s.pool);
                async move {
                    let order: OrderPaid = serde_json::from_slice(&payload)?;
                    let mut tx = store.pool().begin().await?;
                    let by =
                        crate::issue_coupon_tx(store, &mut tx, &order, effects, worker).await?;
                    let executed = by == worker; // a replay answers the first worker's id
                    if executed {
                        tokio::time::sleep(Duration::from_secs(2)).await; // the slow part of the handler
                    }
                    tx.commit().await?;
                    if executed {
                        event(pool, events, seq, worker, "committed", 0).await;
                    }
                    Ok::<_, crate::AppError>(by)
                }
            })
            .await
            .unwrap();
        let (held, outcome) = match settled {
            Settled::Acked { held, outcome } => (held, outcome.map_or("none", |o| o.as_str())),
            _ => (0, "none"),
        };
        event(
            &s.pool,
            events,
            seq,
            worker,
            &format!("outcome {outcome}"),
            held,
        )
        .await;
        event(&s.pool, events, seq, worker, settled.as_str(), held).await;
    }
}
