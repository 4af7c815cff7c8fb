//! The checks of the store's own operations: the state table, expiry, fences, fingerprints.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::{Begin, BeginRequest, Fingerprint, Store};

/// begin on an absent key acquires a lease with a positive fence.
pub async fn absent_key_is_acquired(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("absent"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    assert!(lease.fence > 0);
}

/// begin on a live in-flight key answers InFlight with a retry-after within the ttl.
pub async fn live_lease_answers_in_flight(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("inflight"), key("order-1"));
    acquire(store, &req(&s, &k, Duration::from_secs(10))).await;
    match store.begin(&req(&s, &k, LONG)).await.unwrap() {
        Begin::InFlight { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(10))
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// A retried begin with the token that holds the key acquires again, with the same fence.
pub async fn begin_retry_is_idempotent(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("begin-retry"), key("order-1"));
    let r = req(&s, &k, LONG);
    let a = acquire(store, &r).await;
    let b = acquire(store, &r).await;
    assert_eq!(a, b);
}

/// An expired lease is taken over with a new token and a greater fence.
pub async fn expired_lease_is_taken_over(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("takeover"), key("order-1"));
    let old = acquire(store, &req(&s, &k, SHORT)).await;
    let new = acquire_eventually(store, &s, &k, LONG).await;
    assert_ne!(old.token, new.token);
    assert!(
        new.fence > old.fence,
        "fence {} !> {}",
        new.fence,
        old.fence
    );
}

/// After a takeover the stale holder can neither complete, extend nor release; the new holder's
/// record is untouched.
pub async fn stale_holder_is_fenced_off(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("stale"), key("order-1"));
    let old = acquire(store, &req(&s, &k, SHORT)).await;
    let new = acquire_eventually(store, &s, &k, LONG).await;
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"stale", LONG).await
    ));
    assert!(lease_lost(store.extend(&s, &k, &old, LONG).await));
    store.release(&s, &k, &old).await.unwrap();
    assert_in_flight(store, &s, &k).await;
    store.complete(&s, &k, &new, b"fresh", LONG).await.unwrap();
    assert!(lease_lost(
        store.complete(&s, &k, &old, b"stale", LONG).await
    ));
    store.release(&s, &k, &old).await.unwrap();
    assert_eq!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed {
            output: b"fresh".to_vec(),
            fingerprint: None,
        }
    );
}

/// A completed key replays exactly the stored bytes (all byte values, 64 KiB).
pub async fn completed_key_replays_exact_output(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("replay"), key("order-1"));
    let output: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 256) as u8).collect();
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, &output, LONG).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            store.begin(&req(&s, &k, LONG)).await.unwrap(),
            Begin::Completed {
                output: output.clone(),
                fingerprint: None,
            }
        );
    }
}

/// A retried complete with the same token succeeds and does not change the record.
pub async fn complete_retry_is_idempotent(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("complete-retry"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"once", LONG).await.unwrap();
    store.complete(&s, &k, &lease, b"once", LONG).await.unwrap();
    assert_eq!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed {
            output: b"once".to_vec(),
            fingerprint: None,
        }
    );
}

/// release frees the key at once (retries are harmless) and the next lease has a greater fence.
pub async fn release_frees_the_key(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("release"), key("order-1"));
    let first = acquire(store, &req(&s, &k, LONG)).await;
    store.release(&s, &k, &first).await.unwrap();
    store.release(&s, &k, &first).await.unwrap();
    let second = acquire(store, &req(&s, &k, LONG)).await;
    assert!(second.fence > first.fence);
    // The first holder's late release must not free the second holder's lease.
    store.release(&s, &k, &first).await.unwrap();
    assert_in_flight(store, &s, &k).await;
}

/// release does not delete a completed record.
pub async fn release_after_complete_keeps_the_record(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("release-done"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"kept", LONG).await.unwrap();
    store.release(&s, &k, &lease).await.unwrap();
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

/// extend keeps a short lease alive well past its ttl.
pub async fn extend_keeps_the_lease(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("extend"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, SHORT)).await;
    let until = Instant::now() + SHORT * 4;
    while Instant::now() < until {
        tokio::time::sleep(SHORT / 3).await;
        store.extend(&s, &k, &lease, SHORT).await.unwrap();
        assert_in_flight(store, &s, &k).await;
    }
    store.complete(&s, &k, &lease, b"ok", LONG).await.unwrap();
}

/// A done record answers Mismatch to another fingerprint, and replays to the same one or none.
pub async fn fingerprints_are_checked(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("fingerprint"), key("order-1"));
    let a = Fingerprint::of(&"payload-a").unwrap();
    let b = Fingerprint::of(&"payload-b").unwrap();
    let lease = acquire(
        store,
        &BeginRequest {
            fingerprint: Some(a),
            ..req(&s, &k, LONG)
        },
    )
    .await;
    store.complete(&s, &k, &lease, b"out", LONG).await.unwrap();
    let with = |fp| BeginRequest {
        fingerprint: fp,
        ..req(&s, &k, LONG)
    };
    assert_eq!(store.begin(&with(Some(b))).await.unwrap(), Begin::Mismatch);
    // The answer carries the record's own fingerprint, whatever the request's.
    let replay = Begin::Completed {
        output: b"out".to_vec(),
        fingerprint: Some(a),
    };
    assert_eq!(store.begin(&with(Some(a))).await.unwrap(), replay);
    assert_eq!(store.begin(&with(None)).await.unwrap(), replay);
}

/// A completion after the lease lapsed (nobody took over) keeps the lease's fingerprint: a later
/// call with another payload is refused, not replayed.
pub async fn lapsed_completion_keeps_the_fingerprint(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("lapsed-fingerprint"), key("order-1"));
    let a = Fingerprint::of(&"payload-a").unwrap();
    let lease = acquire(
        store,
        &BeginRequest {
            fingerprint: Some(a),
            ..req(&s, &k, SHORT)
        },
    )
    .await;
    // The lease lapses (the store's clock decides when; give it twice the ttl), unrenewed.
    tokio::time::sleep(SHORT * 2).await;
    store.complete(&s, &k, &lease, b"late", LONG).await.unwrap();
    let with = |fp| BeginRequest {
        fingerprint: fp,
        ..req(&s, &k, LONG)
    };
    let other = Fingerprint::of(&"payload-b").unwrap();
    assert_eq!(
        store.begin(&with(Some(other))).await.unwrap(),
        Begin::Mismatch
    );
    assert_eq!(
        store.begin(&with(Some(a))).await.unwrap(),
        Begin::Completed {
            output: b"late".to_vec(),
            fingerprint: Some(a),
        }
    );
}

/// Fences strictly increase across releases and takeovers of one key.
pub async fn fences_strictly_increase(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("fence"), key("order-1"));
    let mut last = 0;
    for round in 0..6 {
        let lease = if round % 2 == 0 {
            acquire(store, &req(&s, &k, LONG)).await
        } else {
            // Let this one expire and be taken over instead of released.
            let l = acquire(store, &req(&s, &k, SHORT)).await;
            assert!(l.fence > last);
            last = l.fence;
            acquire_eventually(store, &s, &k, LONG).await
        };
        assert!(lease.fence > last, "fence {} !> {last}", lease.fence);
        last = lease.fence;
        store.release(&s, &k, &lease).await.unwrap();
    }
}

/// A done record is forgotten after `keep`, and the key can run again.
pub async fn done_record_expires_after_keep(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("keep"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, LONG)).await;
    store.complete(&s, &k, &lease, b"out", SHORT).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match store.begin(&req(&s, &k, LONG)).await.unwrap() {
            Begin::Acquired(next) => {
                assert!(next.fence > lease.fence);
                return;
            }
            Begin::Completed { .. } => {
                assert!(Instant::now() < deadline, "done record never expired");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A done record lives for `keep`, not for the lease's ttl.
pub async fn done_record_outlives_the_lease_ttl(store: Arc<dyn Store>) {
    let store = &*store;
    let (s, k) = (scope("done-ttl"), key("order-1"));
    let lease = acquire(store, &req(&s, &k, SHORT)).await;
    store.complete(&s, &k, &lease, b"out", LONG).await.unwrap();
    tokio::time::sleep(SHORT * 2).await;
    assert!(matches!(
        store.begin(&req(&s, &k, LONG)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

/// The same key in two scopes is two records.
pub async fn scopes_are_separate(store: Arc<dyn Store>) {
    let store = &*store;
    let (s1, s2, k) = (scope("scope-a"), scope("scope-b"), key("order-1"));
    let l1 = acquire(store, &req(&s1, &k, LONG)).await;
    store.complete(&s1, &k, &l1, b"a", LONG).await.unwrap();
    acquire(store, &req(&s2, &k, LONG)).await;
}

/// Keys that differ only after the hashing threshold stay different records.
pub async fn long_keys_do_not_collide(store: Arc<dyn Store>) {
    let store = &*store;
    let s = scope("long-keys");
    let base = "k".repeat(crate::MAX_KEY_LEN * 2);
    let (k1, k2) = (key(&format!("{base}1")), key(&format!("{base}2")));
    let l1 = acquire(store, &req(&s, &k1, LONG)).await;
    store.complete(&s, &k1, &l1, b"1", LONG).await.unwrap();
    acquire(store, &req(&s, &k2, LONG)).await;
}

// ---- The wrapper on this store ----
