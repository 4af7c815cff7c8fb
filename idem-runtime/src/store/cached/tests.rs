//! What the cache may answer, and what it must leave to the store: each test named after the
//! rule it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::CachedStore;
use crate::store::{Begin, BeginRequest, Lease, Store};
use crate::{Fingerprint, Key, MemoryStore, Operations, StoreError, Token};

/// The memory store, counting the `begin` calls that reach it.
#[derive(Clone, Default)]
struct Counted {
    store: MemoryStore,
    begins: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl Store for Counted {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
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
        self.store.complete(scope, key, lease, output, keep).await
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

fn req<'a>(scope: &'a str, key: &'a Key, fp: Option<Fingerprint>) -> BeginRequest<'a> {
    BeginRequest {
        scope,
        key,
        token: Token::generate(),
        ttl: Duration::from_secs(30),
        fingerprint: fp,
    }
}

fn fp(text: &str) -> Fingerprint {
    Fingerprint::of(&text).unwrap()
}

/// Claim and complete `key` through `store`.
async fn done(store: &dyn Store, scope: &str, key: &Key, fp: Option<Fingerprint>, keep: Duration) {
    let Begin::Acquired(lease) = store.begin(&req(scope, key, fp)).await.unwrap() else {
        panic!("not acquired")
    };
    store
        .complete(scope, key, &lease, b"coupon", keep)
        .await
        .unwrap();
}

fn setup() -> (Counted, CachedStore<Counted>, Key) {
    let inner = Counted::default();
    let cached = CachedStore::new(inner.clone());
    (inner, cached, Key::new("order-1").unwrap())
}

#[tokio::test]
async fn a_duplicate_of_a_key_completed_here_is_answered_without_the_store() {
    let (inner, cached, key) = setup();
    done(&cached, "s", &key, Some(fp("a")), Duration::from_secs(60)).await;
    let before = inner.begins.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            cached.begin(&req("s", &key, Some(fp("a")))).await.unwrap(),
            Begin::Completed {
                output: b"coupon".to_vec(),
                fingerprint: Some(fp("a")),
            }
        );
    }
    assert_eq!(inner.begins.load(Ordering::SeqCst), before);
    assert_eq!(cached.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_record_is_never_served_after_its_keep() {
    let (inner, cached, key) = setup();
    done(&cached, "s", &key, None, Duration::from_millis(100)).await;
    // Served until its keep, less the 2 ms margin for the stores' millisecond clocks.
    tokio::time::advance(Duration::from_millis(97)).await;
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(cached.hits(), 1);
    // From then on the store answers: its record until its keep, then none.
    tokio::time::advance(Duration::from_millis(1)).await;
    let before = inner.begins.load(Ordering::SeqCst);
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
    tokio::time::advance(Duration::from_millis(2)).await;
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Acquired(_)
    ));
    assert_eq!(inner.begins.load(Ordering::SeqCst), before + 2);
    assert_eq!(cached.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_record_is_served_at_most_max_age_even_with_a_longer_keep() {
    let inner = Counted::default();
    let cached = CachedStore::builder(inner.clone())
        .max_age(Duration::from_secs(1))
        .build();
    let key = Key::new("k").unwrap();
    done(&cached, "s", &key, None, Duration::from_secs(3600)).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    let before = inner.begins.load(Ordering::SeqCst);
    // The store still has it: its answer, not the cache's.
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
    assert_eq!(inner.begins.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn another_fingerprint_is_refused_by_the_store_never_replayed() {
    let (inner, cached, key) = setup();
    done(&cached, "s", &key, Some(fp("a")), Duration::from_secs(60)).await;
    let before = inner.begins.load(Ordering::SeqCst);
    assert_eq!(
        cached.begin(&req("s", &key, Some(fp("b")))).await.unwrap(),
        Begin::Mismatch
    );
    assert_eq!(inner.begins.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn a_record_of_one_scope_is_never_an_answer_in_another() {
    let (_, cached, key) = setup();
    done(&cached, "payments", &key, None, Duration::from_secs(60)).await;
    assert!(matches!(
        cached.begin(&req("refunds", &key, None)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test]
async fn a_key_in_flight_or_released_is_never_cached() {
    let (_, cached, key) = setup();
    let Begin::Acquired(lease) = cached.begin(&req("s", &key, None)).await.unwrap() else {
        panic!()
    };
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::InFlight { .. }
    ));
    cached.release("s", &key, &lease).await.unwrap();
    assert_eq!(cached.cached(), 0);
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test]
async fn a_mark_the_store_refused_is_not_cached() {
    let (_, cached, key) = setup();
    let stale = Lease {
        token: Token::generate(),
        fence: 1,
        fingerprint: None,
    };
    let Begin::Acquired(_) = cached.begin(&req("s", &key, None)).await.unwrap() else {
        panic!()
    };
    let refused = cached
        .complete("s", &key, &stale, b"late", Duration::from_secs(60))
        .await;
    assert!(matches!(refused, Err(StoreError::LeaseLost)), "{refused:?}");
    assert_eq!(cached.cached(), 0);
}

#[tokio::test]
async fn the_cache_holds_at_most_its_capacity_and_its_bytes() {
    let cached = CachedStore::builder(MemoryStore::new())
        .capacity(32)
        .build();
    for i in 0..1_000u32 {
        done(
            &cached,
            "s",
            &Key::new(&i).unwrap(),
            None,
            Duration::from_secs(60),
        )
        .await;
    }
    assert!(cached.cached() <= 32, "{} cached", cached.cached());

    let small = CachedStore::builder(MemoryStore::new())
        .max_bytes(16 * 6 * 4)
        .build();
    for i in 0..1_000u32 {
        done(
            &small,
            "s",
            &Key::new(&i).unwrap(),
            None,
            Duration::from_secs(60),
        )
        .await;
    }
    // Six bytes an output: at most four a shard.
    assert!(small.cached() <= 64, "{} cached", small.cached());
}

#[tokio::test]
async fn an_output_past_max_output_is_left_to_the_store() {
    let cached = CachedStore::builder(MemoryStore::new())
        .max_output(5)
        .build();
    let key = Key::new("k").unwrap();
    done(&cached, "s", &key, None, Duration::from_secs(60)).await;
    assert_eq!(cached.cached(), 0);
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
}

#[tokio::test]
async fn records_completed_elsewhere_are_cached_only_when_asked() {
    let (inner, cached, key) = setup();
    done(&inner, "s", &key, None, Duration::from_secs(60)).await;
    for _ in 0..2 {
        assert!(matches!(
            cached.begin(&req("s", &key, None)).await.unwrap(),
            Begin::Completed { .. }
        ));
    }
    assert_eq!(cached.hits(), 0);

    let learning = CachedStore::builder(inner.clone())
        .learn_replays_for(Duration::from_secs(5))
        .build();
    for _ in 0..2 {
        assert!(matches!(
            learning.begin(&req("s", &key, None)).await.unwrap(),
            Begin::Completed { .. }
        ));
    }
    assert_eq!(learning.hits(), 1);
}

#[tokio::test]
async fn a_key_forgotten_through_the_cached_store_runs_again_here() {
    let cached = CachedStore::new(MemoryStore::new());
    let key = Key::new("order-1").unwrap();
    done(&cached, "s", &key, None, Duration::from_secs(60)).await;
    cached.forget("s", &key, true).await.unwrap();
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

/// What the docs say it cannot see: a record forgotten behind its back is replayed until its
/// cached time ends (or `invalidate`).
#[tokio::test]
async fn a_key_forgotten_behind_the_caches_back_is_replayed_until_invalidated() {
    let (inner, cached, key) = setup();
    done(&cached, "s", &key, None, Duration::from_secs(60)).await;
    inner.store.forget("s", &key, true).await.unwrap();
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Completed { .. }
    ));
    cached.invalidate("s", &key);
    assert!(matches!(
        cached.begin(&req("s", &key, None)).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[test]
fn an_insert_prepared_before_a_removal_is_dropped() {
    let table = super::table::Table::new(100, 1 << 20);
    let key = Key::new("k").unwrap();
    let epoch = table.epoch();
    table.remove("s", &key);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    table.insert(epoch, "s", &key, b"stale", None, until);
    assert_eq!(table.len(), 0);
    table.insert(table.epoch(), "s", &key, b"fresh", None, until);
    assert_eq!(table.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_one_key_run_the_handler_once_and_replay_from_the_cache() {
    let cached = CachedStore::new(MemoryStore::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (cached, runs) = (cached.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let opts = crate::Options::new("race")
                .wait(Duration::from_secs(5))
                .ttl(Duration::from_secs(30));
            let mut out = Vec::new();
            for _ in 0..20 {
                let n = crate::run(&cached, &opts, crate::Call::new("order-1"), || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok::<_, crate::Error>(7u32)
                })
                .await
                .unwrap();
                out.push(n);
            }
            out
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().iter().all(|&n| n == 7));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(cached.hits() > 0);
}
