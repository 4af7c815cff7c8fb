//! The outside review's findings: each test a rule the cache broke before its fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::CachedStore;
use crate::store::ops::{Changed, Counts, KeyState, ListQuery, Operations, Page};
use crate::store::{Begin, BeginRequest, Lease, Store};
use crate::{Key, MemoryStore, StoreError, Token};

/// The memory store, with the faults of a network store: a mark whose answer is lost (written,
/// then `Unavailable`), a forget whose answer never comes (applied, then pending for ever), and
/// a `keep` clamped and rounded down to milliseconds as Redis keeps it (so `Duration::MAX` is
/// accepted).
#[derive(Clone, Default)]
struct Faulty {
    store: MemoryStore,
    lose_next_mark_answer: Arc<AtomicBool>,
    hang_after_forget: Arc<AtomicBool>,
    hang_after_mark: Arc<AtomicBool>,
}

const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[async_trait::async_trait]
impl Store for Faulty {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.store.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        // As Redis keeps it: in whole milliseconds, rounded down.
        let keep = Duration::from_millis(keep.min(CENTURY).as_millis() as u64);
        self.store.complete(scope, key, lease, output, keep).await?;
        if self.hang_after_mark.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.lose_next_mark_answer.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the answer was lost".into()));
        }
        Ok(())
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.store.release(scope, key, lease).await
    }
    async fn extend(&self, s: &str, k: &Key, l: &Lease, ttl: Duration) -> Result<(), StoreError> {
        self.store.extend(s, k, l, ttl).await
    }
    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Operations for Faulty {
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        self.store.inspect(scope, key).await
    }
    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        self.store.list(scope, query).await
    }
    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        self.store.counts(scope).await
    }
    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        let changed = self.store.forget(scope, key, force).await;
        if self.hang_after_forget.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        changed
    }
    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        self.store.release_stuck(scope, key, force).await
    }
}

fn req<'a>(key: &'a Key) -> BeginRequest<'a> {
    BeginRequest {
        scope: "s",
        key,
        token: Token::generate(),
        ttl: Duration::from_secs(30),
        fingerprint: None,
    }
}

async fn claim(store: &dyn Store, key: &Key) -> Lease {
    match store.begin(&req(key)).await.unwrap() {
        Begin::Acquired(lease) => lease,
        other => panic!("not acquired: {other:?}"),
    }
}

/// The wrapper retries a mark whose answer was lost (`run::finish::complete`). The store's record
/// dates from the first attempt (a retry by the same token changes nothing), so the cache must
/// not count `keep` from the retry.
#[tokio::test(start_paused = true)]
async fn a_retried_mark_is_never_served_after_the_keep_of_the_first_attempt() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let keep = Duration::from_secs(1);
    let lease = claim(&cached, &key).await;
    inner.lose_next_mark_answer.store(true, Ordering::SeqCst);
    assert!(
        cached
            .complete("s", &key, &lease, b"coupon", keep)
            .await
            .is_err()
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    cached
        .complete("s", &key, &lease, b"coupon", keep)
        .await
        .unwrap();
    // The store's record ended at 1 s; the cache's must have too.
    tokio::time::advance(Duration::from_millis(600)).await;
    assert!(matches!(
        inner.store.begin(&req(&key)).await.unwrap(),
        Begin::Acquired(_)
    ));
    inner.store.forget("s", &key, true).await.unwrap();
    assert!(
        matches!(cached.begin(&req(&key)).await.unwrap(), Begin::Acquired(_)),
        "replayed from the cache after the store's record expired"
    );
}

/// `max_age(Duration::MAX)` with a `keep` of `Duration::MAX` (both accepted by their setters):
/// `Instant + Duration` must not overflow after the store took the mark.
#[tokio::test]
async fn a_keep_and_max_age_of_duration_max_never_panic_on_complete() {
    let cached = CachedStore::builder(Faulty::default())
        .max_age(Duration::MAX)
        .build();
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    cached
        .complete("s", &key, &lease, b"coupon", Duration::MAX)
        .await
        .unwrap();
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

#[tokio::test]
async fn learn_replays_for_duration_max_never_panics() {
    let inner = Faulty::default();
    let cached = CachedStore::builder(inner.clone())
        .max_age(Duration::MAX)
        .learn_replays_for(Duration::MAX)
        .build();
    let key = Key::new("order-1").unwrap();
    let lease = claim(&inner, &key).await;
    inner
        .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            cached.begin(&req(&key)).await.unwrap(),
            Begin::Completed { .. }
        ));
    }
    assert_eq!(cached.hits(), 1);
}

/// An operator's forget whose future is dropped after the store applied it (an admin request
/// whose client went away, a timeout around it): the cached record must go too.
#[tokio::test(start_paused = true)]
async fn a_forget_dropped_after_the_store_forgot_still_drops_the_cached_record() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    cached
        .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    inner.hang_after_forget.store(true, Ordering::SeqCst);
    let forget = tokio::time::timeout(Duration::from_secs(1), cached.forget("s", &key, false));
    assert!(forget.await.is_err(), "the forget was meant to hang");
    assert!(
        matches!(cached.begin(&req(&key)).await.unwrap(), Begin::Acquired(_)),
        "the cache replayed a record forgotten in the store"
    );
}

/// `capacity` is "the most records cached at once": of the whole cache, not of each shard.
#[tokio::test]
async fn capacity_bounds_the_whole_cache_not_each_of_its_shards() {
    for capacity in [1, 5, 17] {
        let cached = CachedStore::builder(MemoryStore::new())
            .capacity(capacity)
            .build();
        for i in 0..200u32 {
            let key = Key::new(&i).unwrap();
            let lease = claim(&cached, &key).await;
            cached
                .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(
            cached.cached() <= capacity,
            "capacity {capacity}: {} cached",
            cached.cached()
        );
        assert!(cached.cached() > 0, "capacity {capacity}: nothing cached");
    }
}

/// `max_bytes` is "the most bytes of outputs cached at once", of the whole cache.
#[tokio::test]
async fn max_bytes_bounds_the_whole_cache() {
    let cached = CachedStore::builder(MemoryStore::new())
        .max_bytes(100)
        .build();
    for i in 0..200u32 {
        let key = Key::new(&i).unwrap();
        let lease = claim(&cached, &key).await;
        cached
            .complete("s", &key, &lease, b"1234567", Duration::from_secs(60))
            .await
            .unwrap();
    }
    // Seven bytes an output: at most 14 records.
    assert!(cached.cached() <= 14, "{} cached", cached.cached());
}

/// When the cache has no room to remember a failed mark, no retry of it may be cached with the
/// retry's clock: none is cached until that mark's `keep` has passed.
#[tokio::test(start_paused = true)]
async fn a_retried_mark_the_cache_had_no_room_to_track_is_not_cached() {
    let inner = Faulty::default();
    let cached = CachedStore::builder(inner.clone()).capacity(1).build();
    let keep = Duration::from_secs(1);
    let (a, b) = (Key::new("a").unwrap(), Key::new("b").unwrap());
    let (lease_a, lease_b) = (claim(&cached, &a).await, claim(&cached, &b).await);
    for (key, lease) in [(&a, &lease_a), (&b, &lease_b)] {
        inner.lose_next_mark_answer.store(true, Ordering::SeqCst);
        assert!(
            cached
                .complete("s", key, lease, b"coupon", keep)
                .await
                .is_err()
        );
    }
    tokio::time::advance(Duration::from_millis(500)).await;
    cached
        .complete("s", &b, &lease_b, b"coupon", keep)
        .await
        .unwrap();
    assert_eq!(cached.cached(), 0);
    // Once the keep of every mark it could not track has passed (the retry's own too), marks
    // are cached again.
    tokio::time::advance(Duration::from_millis(1100)).await;
    let c = Key::new("c").unwrap();
    let lease_c = claim(&cached, &c).await;
    cached
        .complete("s", &c, &lease_c, b"coupon", keep)
        .await
        .unwrap();
    assert_eq!(cached.cached(), 1);
}

/// The cache replays only the store's record: a key marked anew here (its record forgotten by
/// another process, the old one still cached) with an output too large to cache must not be
/// answered with the old record, whose fingerprint the store no longer has.
#[tokio::test]
async fn a_mark_too_large_to_cache_replaces_the_keys_record_of_before() {
    let inner = Faulty::default();
    let cached = CachedStore::builder(inner.clone()).max_output(10).build();
    let key = Key::new("order-1").unwrap();
    let fp = |t: &str| crate::Fingerprint::of(&t).unwrap();
    let with = |f| BeginRequest {
        fingerprint: Some(f),
        ..req(&key)
    };
    let Begin::Acquired(lease) = cached.begin(&with(fp("old"))).await.unwrap() else {
        panic!()
    };
    cached
        .complete("s", &key, &lease, b"old", Duration::from_secs(60))
        .await
        .unwrap();
    inner.store.forget("s", &key, false).await.unwrap(); // another process's operator
    let Begin::Acquired(lease) = cached.begin(&with(fp("new"))).await.unwrap() else {
        panic!()
    };
    cached
        .complete("s", &key, &lease, &[7; 64], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        cached.begin(&with(fp("old"))).await.unwrap(),
        Begin::Mismatch,
        "the cache answered with the record the store replaced"
    );
}

/// `clear` drops the cached records, not what the cache knows of marks in progress.
#[tokio::test(start_paused = true)]
async fn a_clear_between_a_failed_mark_and_its_retry_still_knows_the_retry() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let keep = Duration::from_secs(1);
    let lease = claim(&cached, &key).await;
    inner.lose_next_mark_answer.store(true, Ordering::SeqCst);
    assert!(
        cached
            .complete("s", &key, &lease, b"coupon", keep)
            .await
            .is_err()
    );
    cached.clear();
    tokio::time::advance(Duration::from_millis(500)).await;
    cached
        .complete("s", &key, &lease, b"coupon", keep)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_millis(600)).await;
    inner.store.forget("s", &key, true).await.unwrap();
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

/// The docs: "a done mark the watchdog finishes in the background is not cached (the next
/// duplicate asks the store)", and the transactional form is the store's, never the cache's.
#[tokio::test]
async fn the_watchdogs_store_and_the_transactional_form_are_the_stores_underneath() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    assert!(cached.transactional().is_none());
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    cached
        .for_watchdog()
        .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cached.cached(), 0);
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(cached.hits(), 0);
}

/// Through the wrapper: a handler whose mark's first answer is lost runs once, and its duplicate
/// is replayed (from the store, then the cache), never run again.
#[tokio::test]
async fn through_run_a_lost_mark_answer_runs_the_handler_once() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    inner.lose_next_mark_answer.store(true, Ordering::SeqCst);
    let opts = crate::Options::new("s");
    for _ in 0..3 {
        let out = crate::run(&cached, &opts, crate::Call::new("order-1"), || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, crate::Error>(7u32)
        })
        .await;
        assert_eq!(out.unwrap(), 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `Options::keep(Duration::MAX)` is accepted; the memory store under the cache must take it.
#[tokio::test]
async fn the_memory_store_takes_a_keep_of_duration_max() {
    let cached = CachedStore::builder(MemoryStore::new())
        .max_age(Duration::MAX)
        .build();
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    cached
        .complete("s", &key, &lease, b"coupon", Duration::MAX)
        .await
        .unwrap();
    assert!(matches!(
        cached.inner().begin(&req(&key)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

/// Redis keeps `keep` in whole milliseconds (rounded down), SQLite's clock has millisecond
/// precision: the store's record may end up to a millisecond before `sent + keep`. The cache
/// must have stopped serving it by then.
#[tokio::test(start_paused = true)]
async fn a_record_is_never_served_after_a_keep_the_store_rounded_down() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    let keep = Duration::from_secs(1) + Duration::from_micros(999);
    cached
        .complete("s", &key, &lease, b"coupon", keep)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_micros(1_000_500)).await;
    assert!(
        matches!(cached.begin(&req(&key)).await.unwrap(), Begin::Acquired(_)),
        "replayed from the cache after the store's record expired"
    );
}

/// The wrapper's last resort for a large output (`run::finish::complete`) retries the mark with
/// another output (an unreplayable marker): when an earlier attempt landed, the store keeps that
/// attempt's output. The cache must not answer with the retry's.
#[tokio::test]
async fn a_retried_mark_with_another_output_is_never_the_cached_answer() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let keep = Duration::from_secs(60);
    let lease = claim(&cached, &key).await;
    inner.lose_next_mark_answer.store(true, Ordering::SeqCst);
    assert!(
        cached
            .complete("s", &key, &lease, b"first", keep)
            .await
            .is_err()
    );
    cached
        .complete("s", &key, &lease, b"other", keep)
        .await
        .unwrap();
    assert_eq!(
        cached.begin(&req(&key)).await.unwrap(),
        inner.store.begin(&req(&key)).await.unwrap(),
        "the cache's answer is not the store's"
    );
}

/// Cancellation: a mark whose future is dropped while the store answers (written, answer not
/// read) is not cached, nor is its retry (the store's record is the dropped attempt's).
#[tokio::test(start_paused = true)]
async fn a_mark_dropped_at_its_await_and_its_retry_are_not_cached() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let keep = Duration::from_secs(1);
    let lease = claim(&cached, &key).await;
    inner.hang_after_mark.store(true, Ordering::SeqCst);
    let mark = cached.complete("s", &key, &lease, b"coupon", keep);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), mark)
            .await
            .is_err()
    );
    assert_eq!(cached.cached(), 0);
    inner.hang_after_mark.store(false, Ordering::SeqCst);
    cached
        .complete("s", &key, &lease, b"coupon", keep)
        .await
        .unwrap();
    assert_eq!(cached.cached(), 0);
    tokio::time::advance(Duration::from_millis(600)).await;
    inner.store.forget("s", &key, true).await.unwrap();
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

/// The docs: `learn_replays_for` is "bounded by `max_age`".
#[tokio::test(start_paused = true)]
async fn a_learned_replay_is_served_at_most_max_age() {
    let inner = Faulty::default();
    let cached = CachedStore::builder(inner.clone())
        .max_age(Duration::from_secs(1))
        .learn_replays_for(Duration::from_secs(10))
        .build();
    let key = Key::new("order-1").unwrap();
    let lease = claim(&inner, &key).await;
    inner
        .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Completed { .. }
    ));
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(cached.hits(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    inner.store.forget("s", &key, true).await.unwrap();
    assert!(matches!(
        cached.begin(&req(&key)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

/// The docs: `release_stuck` through the cached store drops the key here too.
#[tokio::test]
async fn release_stuck_through_the_cached_store_drops_the_cached_record() {
    let inner = Faulty::default();
    let cached = CachedStore::new(inner.clone());
    let key = Key::new("order-1").unwrap();
    let lease = claim(&cached, &key).await;
    cached
        .complete("s", &key, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cached.cached(), 1);
    let _ = cached.release_stuck("s", &key, true).await;
    assert_eq!(cached.cached(), 0);
}

/// A record whose time is over when it would be cached (a `keep` under the 2 ms margin, a
/// `max_age` of zero) is not cached: it would only push a live record out.
#[tokio::test]
async fn a_record_over_before_it_is_cached_never_evicts_a_live_one() {
    let cached = CachedStore::builder(MemoryStore::new()).capacity(1).build();
    let (a, b) = (Key::new("a").unwrap(), Key::new("b").unwrap());
    let lease = claim(&cached, &a).await;
    cached
        .complete("s", &a, &lease, b"coupon", Duration::from_secs(60))
        .await
        .unwrap();
    let lease = claim(&cached, &b).await;
    cached
        .complete("s", &b, &lease, b"coupon", Duration::from_millis(1))
        .await
        .unwrap();
    assert!(matches!(
        cached.begin(&req(&a)).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(cached.hits(), 1);
}
