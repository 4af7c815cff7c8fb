//! Per-call cost of `#[idempotent]` on the in-memory store, side by side with calling the same
//! function without the attribute (what a user pays for the wrapper itself, no network).
//!
//! ```text
//! cargo bench -p idem-benches --bench overhead
//! ```

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;

use idem_runtime::{
    Begin, BeginRequest, CachedStore, Call, Key, Lease, MemoryStore, Options, Store, StoreError,
    idempotent, run,
};

#[derive(Debug)]
struct AppError;
impl From<idem_runtime::Error> for AppError {
    fn from(_: idem_runtime::Error) -> Self {
        AppError
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Coupon {
    id: u64,
    code: String,
}

/// The baseline: the handler as it was before the attribute.
async fn issue_direct(order_id: u64) -> Result<Coupon, AppError> {
    Ok(Coupon {
        id: order_id,
        code: format!("C-{order_id}"),
    })
}

#[idempotent(key = "order_id", ttl = "30s", keep = "2s")]
async fn issue(order_id: u64) -> Result<Coupon, AppError> {
    Ok(Coupon {
        id: order_id,
        code: format!("C-{order_id}"),
    })
}

/// Grants every claim and keeps nothing: isolates the wrapper's cost from the store's.
struct NullStore;

#[async_trait::async_trait]
impl Store for NullStore {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        Ok(Begin::Acquired(req.lease(1)))
    }
    async fn complete(
        &self,
        _: &str,
        _: &Key,
        _: &Lease,
        output: &[u8],
        _: Duration,
    ) -> Result<(), StoreError> {
        black_box(output);
        Ok(())
    }
    async fn release(&self, _: &str, _: &Key, _: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
    async fn extend(&self, _: &str, _: &Key, _: &Lease, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    fn for_watchdog(&self) -> std::sync::Arc<dyn Store> {
        std::sync::Arc::new(NullStore)
    }
}

fn bench(c: &mut Criterion) {
    idem_runtime::install_default_store(MemoryStore::new()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let next = AtomicU64::new(1);
    let mut g = c.benchmark_group("memory-store");
    g.bench_function("direct call (baseline)", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed);
            black_box(issue_direct(black_box(n)).await.ok())
        })
    });
    g.bench_function("#[idempotent] first call of a key", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed);
            black_box(issue(black_box(n)).await.ok())
        })
    });
    // The same wrapper through `run`, with records kept 50 ms: the map stays at a steady size
    // (tens of thousands of records) instead of growing by millions during the measurement, so
    // this isolates the wrapper's own cost from the cost of a growing hash map.
    let store = MemoryStore::new();
    let opts = Options::new("bench::steady").keep(Duration::from_millis(50));
    g.bench_function("run() first call of a key, steady-state store", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let out: Result<Coupon, AppError> =
                run(&store, &opts, Call::new(&n), || issue_direct(black_box(n))).await;
            black_box(out.ok())
        })
    });
    // The wrapper with a store that keeps nothing: what the wrapper itself costs (key, token,
    // two store calls through the object-safe trait, encoding), apart from any store's work.
    g.bench_function(
        "run() first call, store that does nothing (wrapper alone)",
        |b| {
            b.to_async(&rt).iter(|| async {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let out: Result<Coupon, AppError> = run(&NullStore, &opts, Call::new(&n), || {
                    issue_direct(black_box(n))
                })
                .await;
                black_box(out.ok())
            })
        },
    );
    rt.block_on(issue(0)).ok().unwrap();
    g.bench_function("#[idempotent] duplicate (replayed)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(issue(black_box(0)).await.ok()) })
    });
    // Duplicates through `run`, on the memory store and on it behind the in-process cache of
    // done records (`CachedStore`): what a duplicate costs when the store is not asked.
    let dup_opts = Options::new("bench::dup").keep(Duration::from_secs(3600));
    let cached = CachedStore::new(MemoryStore::new());
    for n in 0..1_000u64 {
        let plain: Result<Coupon, AppError> =
            rt.block_on(run(&store, &dup_opts, Call::new(&n), || issue_direct(n)));
        let through: Result<Coupon, AppError> =
            rt.block_on(run(&cached, &dup_opts, Call::new(&n), || issue_direct(n)));
        plain.ok().unwrap();
        through.ok().unwrap();
    }
    g.bench_function("run() duplicate, memory store", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed) % 1_000;
            let out: Result<Coupon, AppError> = run(&store, &dup_opts, Call::new(&n), || {
                issue_direct(black_box(n))
            })
            .await;
            black_box(out.ok())
        })
    });
    g.bench_function("run() duplicate, CachedStore over the memory store", |b| {
        b.to_async(&rt).iter(|| async {
            let n = next.fetch_add(1, Ordering::Relaxed) % 1_000;
            let out: Result<Coupon, AppError> = run(&cached, &dup_opts, Call::new(&n), || {
                issue_direct(black_box(n))
            })
            .await;
            black_box(out.ok())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
