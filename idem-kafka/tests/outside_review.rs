//! A second outside review: a partition worker that dies (a handler that panics before it
//! returns its future, an `on_settled` that panics) must not let a fresh worker commit past the
//! records the dead one held.
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idem_kafka::{End, Glue};
use idem_runtime::ack::Policy;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use support::*;

/// Every offset below the committed one was settled final (done or dead-lettered) in `log`.
fn assert_nothing_skipped(log: &Log, committed: Option<i64>) {
    let finals: HashSet<i64> = log.finals(0).iter().map(|s| s.offset).collect();
    for o in 0..committed.unwrap_or(0) {
        assert!(
            finals.contains(&o),
            "offset {o} is committed past (committed {committed:?}) but was never final: \
             settled {:?}",
            log.all()
                .iter()
                .map(|s| (s.offset, s.end.clone()))
                .collect::<Vec<_>>()
        );
    }
}

fn policy() -> Policy {
    Policy::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(20), Duration::from_millis(50))
}

/// A handler closure that panics on a poison record before it returns its future (a body that
/// does not parse, `unwrap`ed outside the `async` block): a failure of the handler like a panic
/// inside the future (retried, then dead-lettered), never a dead worker whose queued records a
/// fresh worker commits past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_before_its_future_loses_no_record() {
    if kafka().await.is_none() {
        return;
    }
    let (topic, group) = (unique("idem_kafka_syncpanic"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let p = producer();
    produce(&p, &topic, 0, "a", b"a").await;
    produce(&p, &topic, 0, "boom", b"boom").await;
    produce(&p, &topic, 0, "c", b"c").await;
    let log = Log::default();
    let glue = glue(&group, policy(), &log);
    glue.subscribe(&[&topic]).unwrap();
    let (l, p2, t2) = (log.clone(), p.clone(), topic.clone());
    let result = glue
        .run_until(
            |record: Arc<OwnedMessage>| {
                // Synchronous work before the future, as a closure body often has.
                assert_ne!(
                    record.payload(),
                    Some(&b"boom"[..]),
                    "a poison record (on purpose)"
                );
                async { Ok::<(), std::io::Error>(()) }
            },
            async move {
                wait_until(30, "the first record was not settled", || l.len() >= 1).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                // A record produced after the poison one: it reaches whichever worker the loop
                // has for the partition now.
                produce(&p2, &t2, 0, "d", b"d").await;
                for _ in 0..150 {
                    if l.len() >= 4 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            },
        )
        .await;
    let committed = committed(&group, &topic, 1).await[0];
    assert_nothing_skipped(&log, committed);
    result.unwrap();
    assert_eq!(committed, Some(4));
    assert!(
        log.all()
            .iter()
            .any(|s| s.offset == 1 && matches!(s.end, End::DeadLettered { .. }))
    );
    assert_eq!(read_all(&dlq, 0, 1, 20).await.len(), 1);
}

/// An `on_settled` callback that panics kills the partition's worker with the records queued
/// behind it: the loop must not start a fresh worker for the same assignment that commits past
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_does_not_let_a_fresh_one_commit_past_its_records() {
    if kafka().await.is_none() {
        return;
    }
    let (topic, group) = (unique("idem_kafka_deadworker"), unique("g"));
    create_topic(&topic, 1).await;
    let p = producer();
    for k in ["a", "b", "c"] {
        produce(&p, &topic, 0, k, k.as_bytes()).await;
    }
    let log = Log::default();
    let l = log.clone();
    let glue = Glue::builder(config(&group))
        .policy(policy())
        .on_settled(move |s| {
            l.0.lock().unwrap().push(s.clone());
            // A bug in the callback, on the first record.
            assert_ne!(s.offset, 0, "on_settled panics (on purpose)");
        })
        .build()
        .unwrap();
    glue.subscribe(&[&topic]).unwrap();
    let (l, p2, t2) = (log.clone(), p.clone(), topic.clone());
    let result = glue
        .run_until(
            |_record: Arc<OwnedMessage>| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<(), std::io::Error>(())
            },
            async move {
                wait_until(30, "the first record was not settled", || l.len() >= 1).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                produce(&p2, &t2, 0, "d", b"d").await;
                tokio::time::sleep(Duration::from_secs(4)).await;
            },
        )
        .await;
    let committed = committed(&group, &topic, 1).await[0];
    assert_nothing_skipped(&log, committed);
    // The loop stops: its worker died with records queued.
    assert!(
        matches!(
            result,
            Err(idem_kafka::Error::WorkerFailed { partition: 0, .. })
        ),
        "{result:?}"
    );
    assert_eq!(committed, Some(1));
}

/// A partition paused because its worker had too many records waiting, then revoked and
/// assigned back to the same consumer by a rebalance: its new assignment is fetched again (a
/// pause of the old assignment does not hold the new one for ever), and every record ends
/// committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_across_a_rebalance_is_fetched_again() {
    if kafka().await.is_none() {
        return;
    }
    let (topic, other, group) = (
        unique("idem_kafka_pauserebal"),
        unique("idem_kafka_pauseother"),
        unique("g"),
    );
    create_topic(&topic, 1).await;
    create_topic(&other, 1).await;
    let p = producer();
    for i in 0..6 {
        produce(&p, &topic, 0, &i.to_string(), b"x").await;
    }
    let (log_a, log_b) = (Log::default(), Log::default());
    let la = log_a.clone();
    let a = Glue::builder(config(&group))
        .policy(policy())
        .max_buffered(1)
        .on_settled(move |s| la.0.lock().unwrap().push(s.clone()))
        .build()
        .unwrap();
    a.subscribe(&[&topic]).unwrap();
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let handler = move |_r: Arc<OwnedMessage>| {
        let slow = first.swap(false, std::sync::atomic::Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Ok::<(), std::io::Error>(())
        }
    };
    let done_a = {
        let la = log_a.clone();
        move || la.finals(0).iter().any(|s| s.offset == 5)
    };
    let a2 = a.clone();
    let (grp, oth) = (group.clone(), other.clone());
    let lb = log_b.clone();
    let join_b = async move {
        wait_until(30, "A did not pause", || a2.stats().pauses >= 1).await;
        // B joins the group for another topic: A's partition is revoked and assigned back.
        let b = glue(&grp, policy(), &lb);
        b.subscribe(&[&oth]).unwrap();
        let d = done_a.clone();
        let _ = b
            .run_until(
                |_r: Arc<OwnedMessage>| async { Ok::<(), std::io::Error>(()) },
                async move {
                    for _ in 0..300 {
                        if d() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            )
            .await;
    };
    let done_a2 = {
        let la = log_a.clone();
        move || la.finals(0).iter().any(|s| s.offset == 5)
    };
    let (ra, ()) = tokio::join!(
        a.run_until(handler, async move {
            for _ in 0..400 {
                if done_a2() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }),
        join_b
    );
    let stats = ra.unwrap();
    let settled: Vec<_> = log_a
        .all()
        .iter()
        .map(|s| (s.offset, s.end.clone()))
        .collect();
    assert!(
        log_a.finals(0).iter().any(|s| s.offset == 5),
        "the partition was never fetched again after the rebalance: {settled:?} {stats:?}"
    );
    assert_eq!(committed(&group, &topic, 1).await, [Some(6)], "{settled:?}");
    eprintln!("paused across a rebalance: {settled:?} {stats:?}");
    // The rebalance did revoke it mid-flight (else this test proves nothing).
    assert!(
        log_a.all().iter().any(|s| s.end == End::Abandoned),
        "{settled:?}"
    );
}

/// A poison record with neither a key nor a body: dead-lettered (no key, no body on the copy),
/// then committed; the record behind it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_without_key_or_body_is_dead_lettered_then_committed() {
    if kafka().await.is_none() {
        return;
    }
    let (topic, group) = (unique("idem_kafka_nokey"), unique("g"));
    let dlq = format!("{topic}.dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let p = producer();
    p.send(
        rdkafka::producer::FutureRecord::<(), ()>::to(&topic).partition(0),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    produce(&p, &topic, 0, "ok", b"ok").await;
    let log = Log::default();
    let glue = glue(&group, policy(), &log);
    glue.subscribe(&[&topic]).unwrap();
    let l = log.clone();
    glue.run_until(
        |record: Arc<OwnedMessage>| async move {
            match record.payload() {
                None => Err("no body"),
                Some(_) => Ok(()),
            }
        },
        wait_until(30, "both records settled", move || l.len() >= 2),
    )
    .await
    .unwrap();
    let all = log.all();
    assert!(matches!(all[0].end, End::DeadLettered { .. }), "{all:?}");
    assert!(matches!(all[1].end, End::Committed { .. }), "{all:?}");
    assert_eq!(committed(&group, &topic, 1).await, [Some(2)]);
    let copies = read_all(&dlq, 0, 1, 20).await;
    assert_eq!(copies.len(), 1);
    assert!(copies[0].key().is_none() && copies[0].payload().is_none());
}
