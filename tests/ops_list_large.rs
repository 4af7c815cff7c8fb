//! `Operations::list` over a scope of 100,000 keys on the shared Redis: every key is listed once,
//! in pages bounded by the limit asked for (a whole `SCAN` step more at most) (the store reads a bounded `SCAN` step per
//! page, never `KEYS`), so an operator's `idem list` stays bounded in memory and in Redis load.
//! (`SCAN` may return a key twice, as Redis documents: counted, never a key missing.)
mod redis_support;
mod support;

use std::collections::HashSet;

use idem_runtime::{Call, Error, ListQuery, Operations, Options, StateFilter, Token, run};

const KEYS: usize = 100_000;
const LIMIT: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_a_hundred_thousand_keys_bounded_by_the_limit() {
    let Some(store) = redis_support::shared_store().await else {
        return;
    };
    let scope = format!("ops_list_large.{}", Token::generate().to_hex());
    let scope: &'static str = Box::leak(scope.into_boxed_str());
    let opts = Options::new(scope).keep(std::time::Duration::from_secs(300));
    // Written through idem itself, 256 at a time.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..256usize {
        let (store, opts) = (store.clone(), opts.clone());
        tasks.spawn(async move {
            for n in (worker..KEYS).step_by(256) {
                let out: Result<u32, Error> =
                    run(&store, &opts, Call::new(&(n as u64)), || async { Ok(1) }).await;
                out.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mut seen = HashSet::with_capacity(KEYS);
    let (mut pages, mut largest, mut rows) = (0usize, 0usize, 0usize);
    let mut query = ListQuery::new(LIMIT).state(StateFilter::Done);
    loop {
        let page = store.list(scope, &query).await.unwrap();
        pages += 1;
        largest = largest.max(page.records.len());
        rows += page.records.len();
        // Redis's `SCAN` may return a key twice (it says so); never one missing.
        seen.extend(page.records.into_iter().map(|r| r.key));
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
        assert!(pages < 10 * KEYS / LIMIT, "the listing does not end");
    }
    let counts = store.counts(scope).await.unwrap();
    // Clean up what the test wrote (its records expire after `keep` anyway).
    if let Some(mut conn) = redis_support::shared_conn().await {
        let pattern = format!("idem:{{{scope}|*");
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = idem_runtime::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = idem_runtime::redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    assert_eq!(
        seen.len(),
        KEYS,
        "every key listed ({pages} pages, {rows} rows)"
    );
    eprintln!("{KEYS} keys: {pages} pages of at most {largest} records, {rows} rows");
    // A page ends with a whole SCAN step (of LIMIT keys asked): about twice the limit at most.
    assert!(
        largest <= 3 * LIMIT,
        "a page held {largest} records, the limit is {LIMIT}"
    );
    assert_eq!(counts.done, KEYS as u64);
}
