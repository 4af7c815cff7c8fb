//! An outside review of the glue: each test named after what breaks. Cancellation mid-handler,
//! a rebalance mid-flight, a broker restart mid-flight (a broker of the test's own), a poison
//! record that panics the handler.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idem_kafka::{End, Glue};
use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use support::*;

struct Fixture {
    pool: idem_runtime::sqlx::PgPool,
    table: String,
    ctx: Ctx,
}

async fn fixture(pool: idem_runtime::sqlx::PgPool) -> Fixture {
    let (table, effects) = (unique("idem_kafka"), unique("eff"));
    create_effects(&pool, &effects).await;
    let store = pg_store(&pool, &table).await;
    let ctx = Ctx {
        pool: pool.clone(),
        store,
        run: Arc::from(unique("run").as_str()),
        effects: Arc::from(effects.as_str()),
        worker: Arc::from("w0"),
    };
    Fixture { pool, table, ctx }
}

impl Fixture {
    async fn cleanup(self) {
        drop_table(&self.pool, &self.ctx.effects).await;
        drop_store(&self.pool, &self.table).await;
    }
}

type Work = std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, AppError>> + Send>>;

/// The transactional handler, raising `started` when it begins.
fn tx_handler(
    ctx: &Ctx,
    started: &Arc<AtomicBool>,
) -> impl Fn(Arc<OwnedMessage>) -> Work + Send + Sync + 'static {
    let (ctx, started) = (ctx.clone(), Arc::clone(started));
    move |record| {
        let (ctx, started) = (ctx.clone(), Arc::clone(&started));
        Box::pin(async move {
            started.store(true, Ordering::SeqCst);
            ctx.handle_tx(record.payload().unwrap_or_default()).await
        })
    }
}

/// Dropping `run` while the handler is inside its transaction: nothing is committed (neither
/// the offset nor, the transaction being dropped, the effect); the next consumer of the group
/// runs it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_run_mid_handler_commits_nothing_and_the_next_consumer_runs_it_once() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_cancel"), unique("g"));
    create_topic(&topic, 1).await;
    produce(&producer(), &topic, 0, "80", &order(80, 3000)).await;
    let started = Arc::new(AtomicBool::new(false));
    let log = Log::default();
    let a = glue(&group, Policy::default(), &log);
    a.subscribe(&[&topic]).unwrap();
    let s = Arc::clone(&started);
    let cancelled = tokio::time::timeout(
        Duration::from_secs(60),
        a.run_until(
            tx_handler(&f.ctx, &started),
            wait_until(60, "the handler did not start", move || {
                s.load(Ordering::SeqCst)
            }),
        ),
    );
    // Stop waiting (the future is dropped) 300 ms after the handler began.
    let s = Arc::clone(&started);
    tokio::select! {
        _ = cancelled => panic!("run returned before it was cancelled"),
        () = async {
            wait_until(60, "the handler did not start", || s.load(Ordering::SeqCst)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        } => {}
    }
    drop(a); // leaves the group
    assert!(log.all().is_empty(), "{:?}", log.all());
    assert_eq!(committed(&group, &topic, 1).await, [None]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        effect_count(&f.pool, &f.ctx.effects).await,
        0,
        "rolled back"
    );

    let log_b = Log::default();
    let b = glue(&group, Policy::default(), &log_b);
    b.subscribe(&[&topic]).unwrap();
    let l = log_b.clone();
    b.run_until(
        tx_handler(&f.ctx, &Arc::new(AtomicBool::new(false))),
        wait_until(60, "the next consumer settled nothing", move || {
            l.len() >= 1
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        log_b.all()[0].end,
        End::Committed {
            outcome: Some(CallOutcome::Executed)
        }
    );
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    assert_eq!(committed(&group, &topic, 1).await, [Some(1)]);
    let s = b.stats();
    row(
        "R1 run dropped mid-handler, next consumer",
        2,
        2,
        1,
        s.commits_requested,
        0,
    );
    f.cleanup().await;
}

/// A second consumer joins while the first is inside a 5 s handler: the first's partition is
/// revoked mid-flight; whatever it finishes after that it does not commit; the record's effect
/// happens once and its offset ends committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_flight_has_one_effect_and_no_stale_commit() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_rebalance"), unique("g"));
    create_topic(&topic, 1).await;
    produce(&producer(), &topic, 0, "70", &order(70, 5000)).await;
    let policy =
        Policy::default().in_flight(Duration::from_millis(100), Duration::from_millis(500));
    let (log_a, log_b) = (Log::default(), Log::default());
    let a = glue(&group, policy, &log_a);
    a.subscribe(&[&topic]).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let (grp, tpc) = (group.clone(), topic.clone());
    let (da, db) = (log_a.clone(), log_b.clone());
    let done = move || {
        let (la, lb) = (da.clone(), db.clone());
        move || {
            la.all()
                .iter()
                .chain(lb.all().iter())
                .any(|s| matches!(s.end, End::Committed { .. }))
        }
    };
    let (la, lb) = (log_a.clone(), log_b.clone());
    let b_ctx = Ctx {
        worker: Arc::from("w1"),
        ..f.ctx.clone()
    };
    let s = Arc::clone(&started);
    let join_b = async {
        wait_until(60, "A's handler did not start", || s.load(Ordering::SeqCst)).await;
        let b = glue(&grp, policy, &lb);
        b.subscribe(&[&tpc]).unwrap();
        b.run_until(
            tx_handler(&b_ctx, &Arc::new(AtomicBool::new(false))),
            wait_until(60, "nobody committed the record", done()),
        )
        .await
        .unwrap();
        b
    };
    let (ra, b) = tokio::join!(
        a.run_until(
            tx_handler(&f.ctx, &started),
            wait_until(60, "nobody committed the record", done())
        ),
        join_b
    );
    ra.unwrap();
    let all: Vec<_> = la.all().into_iter().chain(lb.all()).collect();
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1, "{all:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while committed(&group, &topic, 1).await != [Some(1)] {
        assert!(std::time::Instant::now() < deadline, "{all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let revoked_mid_flight = la.all().iter().any(|s| s.end == End::Abandoned);
    eprintln!("rebalance mid-flight: {all:?} (A's run abandoned: {revoked_mid_flight})");
    let (sa, sb) = (a.stats(), b.stats());
    row(
        "R2 rebalance mid-flight",
        sa.records + sb.records,
        sa.runs + sb.runs,
        1,
        sa.commits_requested + sb.commits_requested,
        0,
    );
    f.cleanup().await;
}

/// The broker is killed (SIGKILL) while a handler runs and comes back after the handler is
/// done: the record is committed once the broker is back, while the loop runs (a commit that
/// failed in the outage is sent again), with one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_flight_loses_no_commit() {
    let Some(pool) = servers().await else { return };
    let Some(mut broker) = OwnBroker::new(&pool).await else {
        return;
    };
    let f = fixture(pool.clone()).await;
    let bs = broker.bootstrap();
    let (topic, group) = (unique("idem_kafka_restart"), unique("g"));
    create_topic_at(&bs, &topic, 1).await;
    produce_at(&bs, &topic, "60", &order(60, 2000)).await;
    let log = Log::default();
    let l = log.clone();
    let glue: Glue = Glue::builder(config_at(&bs, &group))
        .on_settled(move |s| l.0.lock().unwrap().push(s.clone()))
        .build()
        .unwrap();
    glue.subscribe(&[&topic]).unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&started);
    let (bs2, grp, tpc) = (bs.clone(), group.clone(), topic.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let outage = async {
        wait_until(60, "the handler did not start", || s.load(Ordering::SeqCst)).await;
        broker.kill();
        // The handler ends (and its commit is sent) while the broker is down.
        tokio::time::sleep(Duration::from_secs(4)).await;
        broker.start().await;
        let back = std::time::Instant::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        loop {
            let c = committed_at(&bs2, &grp, &tpc, 1).await;
            if c == [Some(1)] {
                eprintln!("committed {:?} after the broker came back", back.elapsed());
                stop.store(true, Ordering::SeqCst);
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not committed 45 s after the broker came back: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (ran, c) = tokio::join!(
        glue.run_until(tx_handler(&f.ctx, &started), async {
            // Stop once the check is done (it asserts on its own).
            wait_until(120, "the check did not end", || {
                stop2.load(Ordering::SeqCst)
            })
            .await;
        }),
        outage
    );
    // (The glue's own `confirmed_offset` may be `None` here: the restart can revoke the
    // partition, and the glue then confirms nothing more for it; the broker's answer counts.)
    ran.expect("run_until, and its last synchronous commit");
    assert_eq!(c, [Some(1)]);
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    let s = glue.stats();
    eprintln!("broker restart: {s:?}");
    row(
        "R3 broker SIGKILLed mid-handler, restarted",
        s.records,
        s.runs,
        1,
        s.commits_requested,
        0,
    );
    drop(glue);
    broker.remove(&pool).await;
    f.cleanup().await;
}

/// A record that makes the handler panic: the panic is a failure, the record is dead-lettered
/// after the attempts, the partition's worker lives on and the next record is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_that_panics_is_dead_lettered_and_the_partition_goes_on() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_panic"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let p = producer();
    produce(&p, &topic, 0, "boom", b"boom").await;
    produce(&p, &topic, 0, "90", &order(90, 0)).await;
    let log = Log::default();
    let policy = Policy::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(20), Duration::from_millis(50));
    let glue = glue(&group, policy, &log);
    glue.subscribe(&[&topic]).unwrap();
    let ctx = f.ctx.clone();
    let l = log.clone();
    glue.run_until(
        move |record: Arc<OwnedMessage>| {
            let ctx = ctx.clone();
            async move {
                if record.payload() == Some(b"boom") {
                    panic!("a poison record (on purpose)");
                }
                ctx.handle_tx(record.payload().unwrap_or_default()).await
            }
        },
        wait_until(60, "the records were not settled", move || l.len() >= 2),
    )
    .await
    .unwrap();
    let all = log.all();
    assert_eq!(
        all[0].end,
        End::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 2 },
            topic: dlq.clone()
        }
    );
    assert_eq!(
        all[1].end,
        End::Committed {
            outcome: Some(CallOutcome::Executed)
        }
    );
    assert_eq!(committed(&group, &topic, 1).await, [Some(2)]);
    assert_eq!(read_all(&dlq, 0, 1, 20).await.len(), 1);
    let s = glue.stats();
    row(
        "R4 poison record panics the handler",
        s.records,
        s.runs,
        1,
        s.commits_requested,
        s.dead_letters,
    );
    f.cleanup().await;
}

/// A held partition with more records waiting than `max_buffered`: its fetching is paused,
/// then resumed; every record is handled once, in order, and committed; the other partition is
/// not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_held_partition_loses_and_reorders_nothing() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_pause"), unique("g"));
    create_topic(&topic, 2).await;
    let p = producer();
    for o in 100..112 {
        produce(&p, &topic, 0, &o.to_string(), &order(o, 0)).await;
    }
    for o in 200..205 {
        produce(&p, &topic, 1, &o.to_string(), &order(o, 0)).await;
    }
    // Order 100 (partition 0's first) is held elsewhere for 2 s.
    let holder_ctx = Ctx {
        worker: Arc::from("holder"),
        ..f.ctx.clone()
    };
    let holder = tokio::spawn(async move { holder_ctx.handle_plain(&order(100, 2000)).await });
    while effect_count(&f.pool, &f.ctx.effects).await < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = Log::default();
    let l = log.clone();
    let glue = Glue::builder(config(&group))
        .policy(Policy::default().in_flight(Duration::from_millis(100), Duration::from_millis(300)))
        .max_buffered(2)
        .on_settled(move |s| l.0.lock().unwrap().push(s.clone()))
        .build()
        .unwrap();
    glue.subscribe(&[&topic]).unwrap();
    let ctx = f.ctx.clone();
    let l = log.clone();
    glue.run_until(
        move |record| {
            let ctx = ctx.clone();
            async move { ctx.handle_plain(record.payload().unwrap_or_default()).await }
        },
        wait_until(60, "not every record was settled", move || l.len() >= 17),
    )
    .await
    .unwrap();
    holder.await.unwrap().unwrap();
    let offsets = |p: i32| log.finals(p).iter().map(|s| s.offset).collect::<Vec<_>>();
    assert_eq!(offsets(0), (0..12).collect::<Vec<i64>>());
    assert_eq!(offsets(1), (0..5).collect::<Vec<i64>>());
    assert_eq!(committed(&group, &topic, 2).await, [Some(12), Some(5)]);
    let per_order = effects_per_order(&f.pool, &f.ctx.effects).await;
    assert_eq!(per_order.len(), 17, "{per_order:?}");
    assert!(per_order.iter().all(|(_, n)| *n == 1), "{per_order:?}");
    let s = glue.stats();
    assert_eq!(s.abandoned, 0, "{s:?}");
    assert!(s.pauses >= 1, "partition 0 was never paused: {s:?}");
    row(
        "R5 held partition paused and resumed",
        s.records,
        s.runs,
        17,
        s.commits_requested,
        0,
    );
    f.cleanup().await;
}

/// `run_until` stops while a record waits for a retry in place (its key held elsewhere): the
/// wait is abandoned at once, nothing is committed for it, and `run_until` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_during_a_retry_in_place_abandons_it_uncommitted() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_stop"), unique("g"));
    create_topic(&topic, 1).await;
    produce(&producer(), &topic, 0, "110", &order(110, 0)).await;
    let holder_ctx = Ctx {
        worker: Arc::from("holder"),
        ..f.ctx.clone()
    };
    let holder = tokio::spawn(async move { holder_ctx.handle_plain(&order(110, 4000)).await });
    while effect_count(&f.pool, &f.ctx.effects).await < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = Log::default();
    let glue = glue(&group, Policy::default(), &log);
    glue.subscribe(&[&topic]).unwrap();
    let ctx = f.ctx.clone();
    let g = glue.clone();
    let stopped = tokio::time::timeout(
        Duration::from_secs(3),
        glue.run_until(
            move |record| {
                let ctx = ctx.clone();
                async move { ctx.handle_plain(record.payload().unwrap_or_default()).await }
            },
            wait_until(30, "no retry in place", move || {
                g.stats().in_flight_retries >= 1
            }),
        ),
    )
    .await
    .expect("run_until did not return within 3 s of the stop")
    .unwrap();
    assert_eq!(log.all().len(), 1);
    assert_eq!(log.all()[0].end, End::Abandoned);
    assert_eq!(stopped.done, 0);
    assert_eq!(committed(&group, &topic, 1).await, [None]);
    holder.await.unwrap().unwrap();
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    row(
        "R6 stop during a retry in place",
        stopped.records,
        stopped.runs,
        1,
        0,
        0,
    );
    f.cleanup().await;
}

/// The dead-letter topic does not exist: the copy is not taken, so the record is not committed
/// (its partition waits, the copy is tried again); once the topic exists the copy lands and the
/// record is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_topic_commits_nothing_until_the_copy_lands() {
    let Some(pool) = servers().await else { return };
    let f = fixture(pool).await;
    let (topic, group) = (unique("idem_kafka_nodlq"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    produce(&producer(), &topic, 0, "poison", b"not json").await;
    let log = Log::default();
    let l = log.clone();
    let mut producer_config = rdkafka::ClientConfig::new();
    producer_config
        .set("bootstrap.servers", brokers())
        .set("message.timeout.ms", "1500");
    let glue = Glue::builder(config(&group))
        .policy(
            Policy::default()
                .max_attempts(1)
                .backoff(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .producer_config(producer_config)
        .on_settled(move |s| l.0.lock().unwrap().push(s.clone()))
        .build()
        .unwrap();
    glue.subscribe(&[&topic]).unwrap();
    let ctx = f.ctx.clone();
    let (g, l, tpc, grp) = (glue.clone(), log.clone(), topic.clone(), group.clone());
    let dlq2 = dlq.clone();
    let check = async move {
        wait_until(30, "no dead letter was refused", || {
            g.stats().dead_letter_failures >= 1
        })
        .await;
        assert!(l.all().is_empty(), "{:?}", l.all());
        assert_eq!(committed(&grp, &tpc, 1).await, [None]);
        create_topic(&dlq2, 1).await;
    };
    let l = log.clone();
    let (ran, ()) = tokio::join!(
        glue.run_until(
            move |record| {
                let ctx = ctx.clone();
                async move { ctx.handle_tx(record.payload().unwrap_or_default()).await }
            },
            wait_until(60, "the dead letter never landed", move || l.len() >= 1),
        ),
        check
    );
    ran.unwrap();
    assert!(matches!(log.all()[0].end, End::DeadLettered { .. }));
    assert_eq!(committed(&group, &topic, 1).await, [Some(1)]);
    assert_eq!(read_all(&dlq, 0, 1, 20).await.len(), 1);
    let s = glue.stats();
    row(
        "R7 dead-letter topic missing, then created",
        s.records,
        s.runs,
        0,
        s.commits_requested,
        s.dead_letters,
    );
    f.cleanup().await;
}

/// Two loops on one glue (it is `Clone`) would split a partition's records between two
/// workers, and a later record's commit would cover an earlier one still in flight; a second
/// loop after the first ended would start past the records the first dropped. Both refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_loop_on_the_same_glue_is_refused() {
    if kafka().await.is_none() {
        return;
    }
    let (topic, group) = (unique("idem_kafka_twice"), unique("g"));
    create_topic(&topic, 1).await;
    let log = Log::default();
    let glue = glue(&group, Policy::default(), &log);
    glue.subscribe(&[&topic]).unwrap();
    let other = glue.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let (first, second) = tokio::join!(
        glue.run_until(
            |_record| async { Ok::<(), std::io::Error>(()) },
            wait_until(30, "not stopped", move || s.load(Ordering::SeqCst)),
        ),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = other
                .run_until(|_record| async { Ok::<(), std::io::Error>(()) }, async {})
                .await;
            stop.store(true, Ordering::SeqCst);
            r
        }
    );
    first.unwrap();
    assert!(
        matches!(second, Err(idem_kafka::Error::LoopUsed)),
        "{second:?}"
    );
    let again = glue
        .run_until(|_record| async { Ok::<(), std::io::Error>(()) }, async {})
        .await;
    assert!(
        matches!(again, Err(idem_kafka::Error::LoopUsed)),
        "{again:?}"
    );
}
