//! The articles' scenarios against the real broker (tansu, PostgreSQL engine), consumers in this
//! process: a producer that sends one order twice, duplicates across two consumers of one group,
//! a handler error that ends in the dead-letter topic, and an in-flight record that holds back
//! its own partition's commit only. Effects are counted in PostgreSQL. (A consumer SIGKILLed
//! between the effect and the commit is in processes.rs.)
mod support;

use std::sync::Arc;
use std::time::Duration;

use idem_kafka::{End, Glue};
use idem_runtime::CallOutcome;
use idem_runtime::ack::{DeadLetterReason, Policy};
use rdkafka::Message;
use rdkafka::message::Headers;

use support::*;

/// A test's topic, idem store table and effects table, dropped at the end.
struct Fixture {
    pool: idem_runtime::sqlx::PgPool,
    topic: String,
    group: String,
    table: String,
    ctx: Ctx,
}

async fn fixture(name: &str, partitions: i32) -> Option<Fixture> {
    let pool = servers().await?;
    let (topic, group, table, effects) = (
        unique(&format!("idem_kafka_{name}")),
        unique("g"),
        unique("idem_kafka"),
        unique("eff"),
    );
    create_topic(&topic, partitions).await;
    create_effects(&pool, &effects).await;
    let store = pg_store(&pool, &table).await;
    let ctx = Ctx {
        pool: pool.clone(),
        store,
        run: Arc::from(unique("run").as_str()),
        effects: Arc::from(effects.as_str()),
        worker: Arc::from("w0"),
    };
    Some(Fixture {
        pool,
        topic,
        group,
        table,
        ctx,
    })
}

impl Fixture {
    async fn cleanup(self) {
        drop_table(&self.pool, &self.ctx.effects).await;
        drop_store(&self.pool, &self.table).await;
    }
}

/// Run `glue` with the transactional handler until `done` holds (60 s at most).
async fn run_tx(glue: &Glue, ctx: &Ctx, done: impl FnMut() -> bool + Send) {
    let ctx = ctx.clone();
    glue.run_until(
        move |record| {
            let ctx = ctx.clone();
            async move { ctx.handle_tx(record.payload().unwrap_or_default()).await }
        },
        wait_until(60, "the scenario did not finish", done),
    )
    .await
    .unwrap();
}

fn outcome(e: &End) -> Option<CallOutcome> {
    match e {
        End::Committed { outcome } => *outcome,
        _ => None,
    }
}

/// Scenario 1: a producer sends one order twice (two records, same order): one effect; the
/// second record is a replay; both offsets are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_produced_twice_has_one_effect_and_both_are_committed() {
    let Some(f) = fixture("twice", 1).await else {
        return;
    };
    let p = producer();
    produce(&p, &f.topic, 0, "1", &order(1, 0)).await;
    produce(&p, &f.topic, 0, "1", &order(1, 0)).await;
    let log = Log::default();
    let glue = glue(&f.group, Policy::default(), &log);
    glue.subscribe(&[&f.topic]).unwrap();
    let l = log.clone();
    run_tx(&glue, &f.ctx, move || l.len() >= 2).await;
    let ends: Vec<_> = log.all().iter().map(|s| outcome(&s.end)).collect();
    assert_eq!(
        ends,
        [Some(CallOutcome::Executed), Some(CallOutcome::Replayed)]
    );
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    assert_eq!(committed(&f.group, &f.topic, 1).await, [Some(2)]);
    let s = glue.stats();
    // The loop's last synchronous commit confirmed it.
    assert_eq!(glue.confirmed_offset(&f.topic, 0), Some(2));
    assert!(s.commits_confirmed >= 1, "{s:?}");
    row(
        "1 one order produced twice",
        s.records,
        s.runs,
        1,
        s.commits_requested,
        s.dead_letters,
    );
    f.cleanup().await;
}

/// Scenario 3: the same order on two partitions, consumed by two consumers of one group at once
/// (each owns one partition): one effect; both records committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_across_two_consumers_of_one_group_have_one_effect() {
    let Some(f) = fixture("group", 2).await else {
        return;
    };
    let (log_a, log_b) = (Log::default(), Log::default());
    let policy = Policy::default().in_flight(Duration::from_millis(50), Duration::from_millis(500));
    let a = glue(&f.group, policy, &log_a);
    let b = glue(&f.group, policy, &log_b);
    a.subscribe(&[&f.topic]).unwrap();
    b.subscribe(&[&f.topic]).unwrap();
    let (la, lb) = (log_a.clone(), log_b.clone());
    let done = move || la.len() + lb.len() >= 2;
    let ctx_a = f.ctx.clone();
    let ctx_b = Ctx {
        worker: Arc::from("w1"),
        ..f.ctx.clone()
    };
    let (ga, gb) = (a.clone(), b.clone());
    let produce_when_split = async {
        // Both members must own a partition before the order is produced.
        wait_until(60, "the group did not split its 2 partitions", || {
            use rdkafka::consumer::Consumer;
            let n = |g: &Glue| g.consumer().assignment().map(|t| t.count()).unwrap_or(0);
            n(&ga) == 1 && n(&gb) == 1
        })
        .await;
        let p = producer();
        // The handler holds its transaction 1.5 s: the second record arrives meanwhile.
        produce(&p, &f.topic, 0, "3", &order(3, 1500)).await;
        produce(&p, &f.topic, 1, "3", &order(3, 1500)).await;
    };
    let done_b = done.clone();
    tokio::join!(
        run_tx(&a, &ctx_a, done),
        run_tx(&b, &ctx_b, done_b),
        produce_when_split
    );
    let all: Vec<_> = log_a.all().into_iter().chain(log_b.all()).collect();
    assert_eq!(log_a.len(), 1, "{all:?}");
    assert_eq!(log_b.len(), 1, "{all:?}");
    let mut ends: Vec<_> = all
        .iter()
        .map(|s| format!("{:?}", outcome(&s.end)))
        .collect();
    ends.sort();
    assert_eq!(ends, ["Some(Executed)", "Some(Replayed)"], "{all:?}");
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    assert_eq!(committed(&f.group, &f.topic, 2).await, [Some(1), Some(1)]);
    let (sa, sb) = (a.stats(), b.stats());
    row(
        "3 duplicates across two consumers of one group",
        sa.records + sb.records,
        sa.runs + sb.runs,
        1,
        sa.commits_requested + sb.commits_requested,
        sa.dead_letters + sb.dead_letters,
    );
    f.cleanup().await;
}

/// Scenario 4: a record the handler fails on (a body that does not decode) is retried, then
/// copied to `<topic>.dlq` and committed; the record behind it is handled; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_ends_in_the_dead_letter_topic_and_is_committed() {
    let Some(f) = fixture("dlq", 1).await else {
        return;
    };
    let dlq = format!("{}.dlq", f.topic);
    create_topic(&dlq, 1).await;
    let p = producer();
    produce(&p, &f.topic, 0, "poison", b"not json").await;
    produce(&p, &f.topic, 0, "41", &order(41, 0)).await;
    let log = Log::default();
    let policy = Policy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(50), Duration::from_millis(200));
    let glue = glue(&f.group, policy, &log);
    glue.subscribe(&[&f.topic]).unwrap();
    let l = log.clone();
    run_tx(&glue, &f.ctx, move || l.len() >= 2).await;
    let all = log.all();
    assert_eq!(
        all[0].end,
        End::DeadLettered {
            reason: DeadLetterReason::HandlerFailed { attempts: 3 },
            topic: dlq.clone()
        },
        "{all:?}"
    );
    assert_eq!(all[0].runs, 3);
    assert_eq!(outcome(&all[1].end), Some(CallOutcome::Executed));
    assert_eq!(committed(&f.group, &f.topic, 1).await, [Some(2)]);
    assert_eq!(effect_count(&f.pool, &f.ctx.effects).await, 1);
    let dead = read_all(&dlq, 0, 1, 20).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(&b"not json"[..]));
    assert_eq!(dead[0].key(), Some(&b"poison"[..]));
    let headers = dead[0].headers().expect("the dead letter has headers");
    let h = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(h("idem-reason").as_deref(), Some("handler_failed"));
    assert_eq!(h("idem-topic").as_deref(), Some(f.topic.as_str()));
    assert_eq!(h("idem-offset").as_deref(), Some("0"));
    assert_eq!(h("idem-failures").as_deref(), Some("3"));
    let s = glue.stats();
    row(
        "4 handler error: dead letter",
        s.records,
        s.runs,
        1,
        s.commits_requested,
        s.dead_letters,
    );
    f.cleanup().await;
}

/// Scenario 5: commit ordering. Another caller holds order 50's key for 3 s. Partition 0 has
/// order 50, then 51; partition 1 has 52 and 53. Partition 1 is done and committed while 50 is
/// in flight; partition 0's commit stays behind 50 (51 waits behind it) until the holder is
/// done and 50 replays; then it is committed to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_record_holds_back_its_own_partition_only() {
    let Some(f) = fixture("order", 2).await else {
        return;
    };
    let p = producer();
    produce(&p, &f.topic, 0, "50", &order(50, 0)).await;
    produce(&p, &f.topic, 0, "51", &order(51, 0)).await;
    produce(&p, &f.topic, 1, "52", &order(52, 0)).await;
    produce(&p, &f.topic, 1, "53", &order(53, 0)).await;
    // The holder: another consumer running order 50 for 3 s (the plain attribute: its claim is
    // visible to the others while it runs).
    let holder_ctx = Ctx {
        worker: Arc::from("holder"),
        ..f.ctx.clone()
    };
    let holder = tokio::spawn(async move { holder_ctx.handle_plain(&order(50, 3000)).await });
    let effects = f.ctx.effects.to_string();
    let pool = f.pool.clone();
    // Its claim and effect exist before the consumer starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while effect_count(&pool, &effects).await < 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = Log::default();
    let policy =
        Policy::default().in_flight(Duration::from_millis(100), Duration::from_millis(400));
    let glue = glue(&f.group, policy, &log);
    glue.subscribe(&[&f.topic]).unwrap();
    let ctx = f.ctx.clone();
    let (l, group, topic) = (log.clone(), f.group.clone(), f.topic.clone());
    let checks = async move {
        wait_until(30, "partition 1 was not settled", || l.finals(1).len() == 2).await;
        // Partition 1 is committed to its end while partition 0's first record is in flight.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = committed(&group, &topic, 2).await;
        while seen[1] != Some(2) {
            assert!(std::time::Instant::now() < deadline, "{seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = committed(&group, &topic, 2).await;
        }
        let p0_settled = l.finals(0).len();
        (seen, p0_settled)
    };
    let l2 = log.clone();
    let (_, (held, p0_settled_while_held)) = tokio::join!(
        glue.run_until(
            move |record| {
                let ctx = ctx.clone();
                async move { ctx.handle_plain(record.payload().unwrap_or_default()).await }
            },
            wait_until(60, "the scenario did not finish", move || l2.len() >= 4),
        ),
        checks
    );
    assert_eq!(
        held,
        [None, Some(2)],
        "partition 0 must be held back, partition 1 not"
    );
    assert_eq!(p0_settled_while_held, 0);
    holder.await.unwrap().unwrap();
    let p0: Vec<_> = log.finals(0);
    assert_eq!(p0.iter().map(|s| s.offset).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(outcome(&p0[0].end), Some(CallOutcome::Replayed));
    assert_eq!(outcome(&p0[1].end), Some(CallOutcome::Executed));
    assert_eq!(committed(&f.group, &f.topic, 2).await, [Some(2), Some(2)]);
    assert_eq!(
        effects_per_order(&f.pool, &f.ctx.effects).await,
        [(50, 1), (51, 1), (52, 1), (53, 1)]
    );
    let s = glue.stats();
    assert_eq!(glue.confirmed_offset(&f.topic, 0), Some(2));
    assert_eq!(glue.confirmed_offset(&f.topic, 1), Some(2));
    assert!(s.in_flight_retries >= 1, "{s:?}");
    row(
        "5 in-flight record holds back its partition only",
        s.records,
        s.runs,
        4,
        s.commits_requested,
        s.dead_letters,
    );
    f.cleanup().await;
}
