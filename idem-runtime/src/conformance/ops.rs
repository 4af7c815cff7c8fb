//! The operations' checks ([`Operations`]): every state as `inspect` sees it, `forget` and
//! `release_stuck` with and without force, the fence rule that refuses an old holder's late
//! mark, `list` paging and filters, `counts`, and a forced `forget` while a handler runs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{LONG, PATIENCE, SHORT, acquire, key, lease_lost, req, scope};
use crate::{
    Begin, BeginRequest, Call, Changed, Error, Fingerprint, KeyState, ListQuery, Operations,
    Options, StateFilter, Store, run,
};

/// A store with the operations, as the checks take it.
pub trait OperableStore: Store + Operations {}
impl<S: Store + Operations> OperableStore for S {}

/// Wait (bounded) until `inspect` says the key's lease lapsed.
async fn until_lapsed(store: &dyn OperableStore, s: &str, k: &crate::Key) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let KeyState::InFlight { lapsed: true, .. } = store.inspect(s, k).await.unwrap() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `inspect` tells every state apart, and changes nothing.
pub async fn ops_inspect_tells_each_state(store: Arc<dyn OperableStore>) {
    let store = &*store;
    let s = scope("ops-inspect");
    let k = key("order-1004");
    assert_eq!(store.inspect(&s, &k).await.unwrap(), KeyState::Absent);
    let fp = Fingerprint::of(&"payload").unwrap();
    let lease = acquire(
        store,
        &BeginRequest {
            fingerprint: Some(fp),
            ..req(&s, &k, LONG)
        },
    )
    .await;
    match store.inspect(&s, &k).await.unwrap() {
        KeyState::InFlight {
            fence,
            lease_left,
            lapsed: false,
            ..
        } => {
            assert_eq!(fence, lease.fence);
            assert!(
                lease_left > Duration::ZERO && lease_left <= LONG,
                "{lease_left:?}"
            );
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    // Inspecting changed nothing: the key is still in flight for others.
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::InFlight { .. }
    ));
    store
        .complete(&s, &k, &lease, b"output!", LONG)
        .await
        .unwrap();
    match store.inspect(&s, &k).await.unwrap() {
        KeyState::Done {
            fingerprint: true,
            output_bytes: 7,
            replayable: true,
            kept_for,
            ..
        } => assert!(
            kept_for > Duration::ZERO && kept_for <= LONG,
            "{kept_for:?}"
        ),
        other => panic!("expected done, got {other:?}"),
    }
    // Released: free, its fence kept.
    let k2 = key("order-1005");
    let lease2 = acquire(store, &req(&s, &k2, LONG)).await;
    store.release(&s, &k2, &lease2).await.unwrap();
    match store.inspect(&s, &k2).await.unwrap() {
        KeyState::Free {
            forgotten: false, ..
        }
        | KeyState::Absent => {}
        other => panic!("expected free, got {other:?}"),
    }
    // Lapsed.
    let k3 = key("order-1006");
    acquire(store, &req(&s, &k3, SHORT)).await;
    until_lapsed(store, &s, &k3).await;
}

/// `forget` lets a done key run again; its next lease has a greater fence.
pub async fn ops_forget_lets_a_done_key_run_again(store: Arc<dyn OperableStore>) {
    let store = &*store;
    let (s, k) = (scope("ops-forget"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"out", LONG).await.unwrap();
    let Changed::Freed { fence } = store.forget(&s, &k, false).await.unwrap() else {
        panic!("a done key was not forgotten")
    };
    assert!(fence > lease.fence, "{fence} !> {}", lease.fence);
    assert!(matches!(
        store.inspect(&s, &k).await.unwrap(),
        KeyState::Free {
            forgotten: true,
            ..
        }
    ));
    // Forgetting it again changes nothing.
    assert_eq!(
        store.forget(&s, &k, false).await.unwrap(),
        Changed::NotFound
    );
    let next = acquire(store, &req(&s, &k, LONG)).await;
    assert!(next.fence > fence, "{} !> {fence}", next.fence);
    // An absent key: nothing to do.
    let absent = key("never-used");
    assert_eq!(
        store.forget(&s, &absent, true).await.unwrap(),
        Changed::NotFound
    );
}

/// A key in flight is refused unless forced; forced, the old holder can no longer mark it done
/// or renew it, and the next delivery runs.
pub async fn ops_forced_forget_refuses_the_old_holders_mark(store: Arc<dyn OperableStore>) {
    let store = &*store;
    let (s, k) = (scope("ops-force"), key("order-1"));
    let old = acquire(store, &req(&s, &k, LONG)).await;
    match store.forget(&s, &k, false).await.unwrap() {
        Changed::Refused {
            state: KeyState::InFlight { .. },
        } => {}
        other => panic!("a live lease was forgotten without force: {other:?}"),
    }
    let Changed::Freed { fence } = store.forget(&s, &k, true).await.unwrap() else {
        panic!("forced forget did nothing")
    };
    assert!(fence > old.fence);
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"late", LONG).await
    ));
    assert!(lease_lost(store.extend(&s, &k, &old, LONG).await));
    let new = acquire(store, &req(&s, &k, LONG)).await;
    assert!(new.fence > fence);
    store.complete(&s, &k, &new, b"fresh", LONG).await.unwrap();
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"late", LONG).await
    ));
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed { output, .. } if output == b"fresh"
    ));
}

/// `release_stuck` frees a lapsed lease without force and a live one only with it, and never
/// touches a done key.
pub async fn ops_release_stuck_frees_only_leases(store: Arc<dyn OperableStore>) {
    let store = &*store;
    let s = scope("ops-release");
    let done = key("done");
    let lease = acquire(store, &req(&s, &done, LONG)).await;
    store
        .complete(&s, &done, &lease, b"out", LONG)
        .await
        .unwrap();
    assert!(matches!(
        store.release_stuck(&s, &done, true).await.unwrap(),
        Changed::Refused {
            state: KeyState::Done { .. }
        }
    ));
    let live = key("live");
    let held = acquire(store, &req(&s, &live, LONG)).await;
    assert!(matches!(
        store.release_stuck(&s, &live, false).await.unwrap(),
        Changed::Refused { .. }
    ));
    assert!(matches!(
        store.release_stuck(&s, &live, true).await.unwrap(),
        Changed::Freed { .. }
    ));
    assert!(lease_lost(
        store.complete(&s, &live, &held, b"late", LONG).await
    ));
    let stuck = key("stuck");
    acquire(store, &req(&s, &stuck, SHORT)).await;
    until_lapsed(store, &s, &stuck).await;
    assert!(matches!(
        store.release_stuck(&s, &stuck, false).await.unwrap(),
        Changed::Freed { .. }
    ));
    assert_eq!(
        store.release_stuck(&s, &key("absent"), true).await.unwrap(),
        Changed::NotFound
    );
}

/// Every (key, state name) `list` returns for `s` with `filter`, page by page (4 a page).
async fn page_through(
    store: &dyn OperableStore,
    s: &str,
    filter: StateFilter,
) -> BTreeSet<(String, &'static str)> {
    let mut seen = BTreeSet::new();
    let mut cursor = None;
    for _page in 0..100 {
        let page = store
            .list(s, &ListQuery::new(4).state(filter).after(cursor))
            .await
            .unwrap();
        // Bounded: at most the limit, except that Redis ends a page on a whole `SCAN` step
        // (a step run again can miss keys Redis moved), which may hold a few more.
        assert!(page.records.len() <= 16, "a page far over its limit");
        for r in page.records {
            seen.insert((r.key, r.state.name()));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return seen,
        }
    }
    panic!("list never ended")
}

/// `list` pages through every record of the scope (and none of another), with its filters, and
/// `counts` agrees.
pub async fn ops_list_pages_and_counts(store: Arc<dyn OperableStore>) {
    let store = &*store;
    let (s, other) = (scope("ops-list"), scope("ops-list-other"));
    for i in 0..10 {
        let k = key(&format!("done-{i:02}"));
        let l = acquire(store, &req(&s, &k, LONG)).await;
        store.complete(&s, &k, &l, b"x", LONG).await.unwrap();
    }
    for i in 0..7 {
        acquire(store, &req(&s, &key(&format!("flight-{i:02}")), LONG)).await;
    }
    for i in 0..6 {
        let k = key(&format!("free-{i:02}"));
        let l = acquire(store, &req(&s, &k, LONG)).await;
        store.release(&s, &k, &l).await.unwrap();
    }
    acquire(store, &req(&other, &key("elsewhere"), LONG)).await;
    let all = page_through(store, &s, StateFilter::All).await;
    let names: BTreeSet<_> = all
        .iter()
        .filter(|(_, state)| *state != "free")
        .map(|(k, _)| k.clone())
        .collect();
    // Released keys are listed free by the stores that keep them for their fences.
    assert_eq!(names.len(), 17, "{all:?}");
    assert!(all.len() == 17 || all.len() == 23, "{all:?}");
    assert!(!all.iter().any(|(k, _)| k == "elsewhere"));
    let flights = page_through(store, &s, StateFilter::InFlight).await;
    assert_eq!(flights.len(), 7, "{flights:?}");
    assert!(
        flights
            .iter()
            .all(|(k, n)| k.starts_with("flight-") && *n == "in_flight")
    );
    let dones = page_through(store, &s, StateFilter::Done).await;
    assert_eq!(dones.len(), 10, "{dones:?}");
    let counts = store.counts(&s).await.unwrap();
    assert_eq!(
        (counts.in_flight, counts.lapsed, counts.done),
        (7, 0, 10),
        "{counts:?}"
    );
    // Released keys are kept free (for their fences) by the stores that keep them.
    assert!(counts.free <= 6, "{counts:?}");
}

/// A forced `forget` of a key whose handler is running: the handler's mark is refused
/// (`LeaseLost`), and the next delivery runs once.
pub async fn ops_forced_forget_while_the_handler_runs(store: Arc<dyn OperableStore>) {
    let plain: Arc<dyn Store> = store.clone();
    let s = scope("ops-forget-running");
    let opts = Arc::new(Options::with_scope(s.clone()).ttl(Duration::from_secs(5)));
    let runs = Arc::new(AtomicU32::new(0));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (store, opts, runs) = (plain.clone(), opts.clone(), runs.clone());
        tokio::spawn(async move {
            run(&*store, &opts, Call::new("order-1004"), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<u32, Error>(1)
            })
            .await
        })
    };
    started.await.unwrap();
    let k = key("order-1004");
    assert!(matches!(
        store.forget(&s, &k, true).await.unwrap(),
        Changed::Freed { .. }
    ));
    finish.send(()).unwrap();
    let late = holder.await.unwrap();
    assert!(
        matches!(late, Err(Error::LeaseLost { .. })),
        "the old holder's mark won: {late:?}"
    );
    let again: Result<u32, Error> = run(&*plain, &opts, Call::new("order-1004"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(2)
    })
    .await;
    assert_eq!(again.unwrap(), 2, "the next delivery did not run");
    let replay: Result<u32, Error> = run(&*plain, &opts, Call::new("order-1004"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(3)
    })
    .await;
    assert_eq!(replay.unwrap(), 2);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
