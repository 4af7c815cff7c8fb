//! The checks of the wrapper on the store: replay, release on failure and cancellation, in-flight
//! refusal and waiting, races, renewal, corrupt records.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Barrier, oneshot};

use super::*;
use crate::{Call, Error, Fingerprint, Options, Store, run};

fn opts(check: &str) -> Options {
    Options::with_scope(scope(check))
}

async fn counted<T>(count: &AtomicU32, value: T) -> Result<T, Error> {
    count.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// The wrapper runs once and replays the exact output to duplicates.
pub async fn wrapper_replays_output(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-replay");
    let runs = AtomicU32::new(0);
    let value = (
        String::from("coupon-\u{1F39F}"),
        vec![1u64, u64::MAX],
        Some(-3i8),
    );
    for _ in 0..3 {
        let out = run(store, &o, Call::new("order-9"), || {
            counted(&runs, value.clone())
        })
        .await;
        assert_eq!(out.unwrap(), value);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler error releases the key: the redelivery runs.
pub async fn wrapper_releases_on_err(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-err");
    let runs = AtomicU32::new(0);
    let failed: Result<u32, Error> = run(store, &o, Call::new(&1u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Err(Error::InvalidKey { reason: "handler" })
    })
    .await;
    assert!(failed.is_err());
    let ok = run(store, &o, Call::new(&1u8), || counted(&runs, 5u32)).await;
    assert_eq!(ok.unwrap(), 5);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A panicking handler releases the key before the panic resumes.
pub async fn wrapper_releases_on_panic(store: Arc<dyn Store>) {
    let owned = store.clone();
    let store = &*store;
    let o = Arc::new(opts("w-panic"));
    let runs = Arc::new(AtomicU32::new(0));
    let task = {
        let (o, runs, owned) = (o.clone(), runs.clone(), owned.clone());
        tokio::spawn(async move {
            let _: Result<(), Error> = run(&owned, &o, Call::new(&2u8), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                panic!("handler panicked");
            })
            .await;
        })
    };
    let joined = task.await;
    assert!(joined.unwrap_err().is_panic());
    let ok = run(store, &o, Call::new(&2u8), || counted(&runs, 6u32)).await;
    assert_eq!(ok.unwrap(), 6);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A cancelled call releases its key (long before the ttl), so a redelivery runs.
pub async fn wrapper_releases_after_cancellation(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-cancel").ttl(LONG);
    let (started_tx, started_rx) = oneshot::channel();
    let call = run(store, &o, Call::new(&3u8), || async move {
        let _ = started_tx.send(());
        std::future::pending::<Result<u32, Error>>().await
    });
    tokio::select! {
        _ = call => unreachable!("the handler never finishes"),
        _ = started_rx => {} // the handler holds the lease: cancel by dropping the call
    }
    // Release is asynchronous for network stores: wait for it, far less than the 60 s ttl.
    let deadline = Instant::now() + PATIENCE;
    let runs = AtomicU32::new(0);
    loop {
        match run(store, &o, Call::new(&3u8), || counted(&runs, 7u32)).await {
            Ok(v) => {
                assert_eq!(v, 7);
                break;
            }
            Err(Error::InFlight { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("key was not released after cancellation: {e}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// By default an in-flight duplicate is refused at once with a retry-after, and not run.
pub async fn wrapper_rejects_in_flight_duplicate(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-reject");
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = run(store, &o, Call::new(&4u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(40u32)
    });
    let second = async {
        started_rx.await.unwrap();
        let dup = run(store, &o, Call::new(&4u8), || counted(&runs, 41u32)).await;
        let _ = finish_tx.send(());
        dup
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 40);
    match second {
        Err(Error::InFlight { retry_after, .. }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected InFlight, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// With `wait`, an in-flight duplicate waits for the holder and replays its output.
pub async fn wrapper_waits_for_in_flight_duplicate(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-wait").wait(PATIENCE);
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let first = run(store, &o, Call::new(&5u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(50u32)
    });
    let second = async {
        started_rx.await.unwrap();
        let dup = run(store, &o, Call::new(&5u8), || counted(&runs, 51u32));
        let mut dup = std::pin::pin!(dup);
        // The duplicate is waiting (not answered) while the holder runs...
        tokio::select! {
            biased;
            r = &mut dup => panic!("duplicate answered while the holder runs: {r:?}"),
            _ = tokio::task::yield_now() => {}
        }
        let _ = finish_tx.send(());
        dup.await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap(), 50);
    assert_eq!(second.unwrap(), 50);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Many tasks race on one key: the effect happens exactly once and every caller gets its output.
pub async fn wrapper_race_runs_once(store: Arc<dyn Store>) {
    const TASKS: usize = 64;
    let o = Arc::new(opts("w-race").wait(PATIENCE));
    let runs = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (o, runs, barrier, store) = (o.clone(), runs.clone(), barrier.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            run(&store, &o, Call::new("the-one-key"), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Long enough that the others arrive while it is in flight.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Error>(i)
            })
            .await
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap().unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "effect ran more than once");
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "{outputs:?}");
}

/// A handler slower than its ttl keeps its lease (the watchdog renews it): a duplicate arriving
/// after several ttls is refused, not run.
pub async fn wrapper_renews_slow_handler(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-slow").ttl(SHORT);
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let slow = run(store, &o, Call::new(&6u8), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(60u32)
    });
    let duplicate = async {
        started_rx.await.unwrap();
        // Three ttls: without renewal the lease would have expired twice over.
        tokio::time::sleep(SHORT * 3).await;
        let dup = run(store, &o, Call::new(&6u8), || counted(&runs, 61u32)).await;
        let _ = finish_tx.send(());
        dup
    };
    let (slow, dup) = tokio::join!(slow, duplicate);
    assert_eq!(slow.unwrap(), 60);
    assert!(matches!(dup, Err(Error::InFlight { .. })), "{dup:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A record that does not decode is a typed error, and the handler does not run.
pub async fn wrapper_reports_corrupt_record(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-corrupt");
    let k = key("7");
    let lease = acquire(store, &req(o.scope_str(), &k, LONG)).await;
    store
        .complete(o.scope_str(), &k, &lease, b"\x42garbage", LONG)
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let out = run(store, &o, Call::new(&7u8), || counted(&runs, 1u32)).await;
    assert!(matches!(out, Err(Error::Corrupt { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The same key with another payload is refused with Mismatch, never run nor replayed.
pub async fn wrapper_refuses_fingerprint_mismatch(store: Arc<dyn Store>) {
    let store = &*store;
    let o = opts("w-mismatch");
    let runs = AtomicU32::new(0);
    let call = |amount: u32| Call::new(&8u8).fingerprint(Fingerprint::of(&amount));
    assert_eq!(
        run(store, &o, call(100), || counted(&runs, 1u32))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        run(store, &o, call(100), || counted(&runs, 2u32))
            .await
            .unwrap(),
        1
    );
    let other = run(store, &o, call(999), || counted(&runs, 3u32)).await;
    assert!(matches!(other, Err(Error::Mismatch { .. })), "{other:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// An empty key is a typed error and nothing runs.
pub async fn wrapper_refuses_empty_key(store: Arc<dyn Store>) {
    let store = &*store;
    let runs = AtomicU32::new(0);
    let out = run(store, &opts("w-empty"), Call::new(""), || {
        counted(&runs, 1u32)
    })
    .await;
    assert!(matches!(out, Err(Error::InvalidKey { .. })), "{out:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
