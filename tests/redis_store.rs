//! What the Redis store promises beyond the shared contract: one round trip per phase, its key
//! layout, typed errors for foreign data, fences from the server, and its constructors.
mod redis_support;
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use idem_runtime::redis::{self, AsyncCommands};
use idem_runtime::{
    Begin, BeginRequest, Call, Error, Key, Options, RedisStore, Store, StoreError, Token, run,
};
use redis_support::{shared_conn, shared_store, start_or_skip};

fn scope(name: &str) -> String {
    format!("idem-redis:{name}:{}", Token::generate().to_hex())
}

fn req<'a>(scope: &'a str, key: &'a Key) -> BeginRequest<'a> {
    BeginRequest {
        scope,
        key,
        token: Token::generate(),
        ttl: Duration::from_secs(60),
        fingerprint: None,
    }
}

async fn acquire(store: &dyn Store, scope: &str, key: &Key) -> idem_runtime::Lease {
    match store.begin(&req(scope, key)).await.unwrap() {
        Begin::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Counts, on a private server, the commands clients sent for `n` calls: `EVALSHA`s only (the
/// rest is what the scripts ran inside).
async fn scripts_sent(
    admin: &mut redis::aio::MultiplexedConnection,
    calls: impl AsyncFnOnce(),
) -> (u64, u64) {
    let before = commandstats(admin).await;
    calls().await;
    let after = commandstats(admin).await;
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    (delta("evalsha"), delta("eval"))
}

/// Each phase is one round trip: a first call is two `EVALSHA`s (begin, complete), a duplicate of
/// a completed key one (with the output in its reply), a duplicate while in flight one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_phase_is_one_round_trip() {
    let Some(server) = start_or_skip() else {
        return;
    };
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let opts = Options::with_scope(scope("round-trips"));
    // Load the scripts (the first call of each falls back to EVAL once).
    let _: Result<u8, Error> = run(&store, &opts, Call::new("warm"), || async { Ok(0) }).await;
    let lease = acquire(&store, "warm", &Key::new("x").unwrap()).await;
    store
        .release("warm", &Key::new("x").unwrap(), &lease)
        .await
        .unwrap();

    const N: u64 = 50;
    let (sha, eval) = scripts_sent(&mut admin, async || {
        for k in 0..N {
            let out: Result<u64, Error> =
                run(&store, &opts, Call::new(&k), || async move { Ok(k) }).await;
            assert_eq!(out.unwrap(), k);
        }
    })
    .await;
    assert_eq!((sha, eval), (2 * N, 0), "first calls");

    let (sha, eval) = scripts_sent(&mut admin, async || {
        for k in 0..N {
            let out: Result<u64, Error> = run(&store, &opts, Call::new(&k), || async {
                panic!("replayed keys never run")
            })
            .await;
            assert_eq!(out.unwrap(), k);
        }
    })
    .await;
    assert_eq!((sha, eval), (N, 0), "duplicates of completed keys");

    let held = Options::with_scope(scope("round-trips-held"));
    for k in 0..N {
        acquire(&store, held.scope_str(), &Key::new(&k).unwrap()).await;
    }
    let (sha, eval) = scripts_sent(&mut admin, async || {
        for k in 0..N {
            let out: Result<u64, Error> = run(&store, &held, Call::new(&k), || async {
                panic!("held keys never run")
            })
            .await;
            assert!(matches!(out, Err(Error::InFlight { .. })), "{out:?}");
        }
    })
    .await;
    assert_eq!((sha, eval), (N, 0), "duplicates while in flight");
}

/// Keys live under the prefix, with one hash tag per record; the characters that delimit the tag
/// and the scope are escaped, so no two (scope, key) pairs share a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_layout_is_tagged_escaped_and_prefixed() {
    let Some(default) = shared_store().await else {
        return;
    };
    let key = Key::new("order-1").unwrap();
    assert_eq!(
        default.record_key("billing::charge", &key),
        "idem:{billing::charge|order-1}"
    );
    assert_eq!(
        default.record_key("s", &Key::new("a}b{c|d%e").unwrap()),
        "idem:{s|a%7Db%7Bc%7Cd%25e}"
    );

    // Pairs that would collide without escaping are separate records.
    let base = scope("layout");
    let (s1, s2) = (format!("{base}|a"), base.clone());
    let (k1, k2) = (Key::new("b").unwrap(), Key::new("a|b").unwrap());
    assert_ne!(default.record_key(&s1, &k1), default.record_key(&s2, &k2));
    let l1 = acquire(&default, &s1, &k1).await;
    default
        .complete(&s1, &k1, &l1, b"one", Duration::from_secs(60))
        .await
        .unwrap();
    acquire(&default, &s2, &k2).await;

    // A custom prefix.
    let client = redis::Client::open(redis_support::redis_url()).unwrap();
    let prefixed = RedisStore::builder(client.get_connection_manager().await.unwrap())
        .prefix("myapp:idem:")
        .build();
    assert_eq!(prefixed.prefix(), "myapp:idem:");
    let s = scope("prefix");
    acquire(&prefixed, &s, &key).await;
    let mut conn = shared_conn().await.unwrap();
    let exists: bool = conn
        .exists(format!("myapp:idem:{{{s}|order-1}}"))
        .await
        .unwrap();
    assert!(exists);
}

/// A value under a record key that the store did not write is a typed `Corrupt` error, and the
/// handler does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_is_reported_corrupt() {
    let (Some(store), Some(mut conn)) = (shared_store().await, shared_conn().await) else {
        return;
    };
    let s = scope("corrupt");
    let (text, list) = (Key::new("text").unwrap(), Key::new("list").unwrap());
    let _: () = conn
        .set_ex(store.record_key(&s, &text), "hello", 60)
        .await
        .unwrap();
    let _: () = conn
        .rpush(store.record_key(&s, &list), "item")
        .await
        .unwrap();
    let _: bool = conn.expire(store.record_key(&s, &list), 60).await.unwrap();
    for key in [&text, &list] {
        assert!(
            matches!(
                store.begin(&req(&s, key)).await,
                Err(StoreError::Corrupt(_))
            ),
            "{key}"
        );
    }
    let opts = Options::with_scope(s.clone());
    let out: Result<u8, Error> = run(&store, &opts, Call::new("text"), || async {
        panic!("must not run")
    })
    .await;
    assert!(matches!(out, Err(Error::Corrupt { .. })), "{out:?}");
}

/// A key's next fence is its last one + 1 whenever Redis still has the key's record (released, or
/// in flight with a lapsed lease), whatever Redis's clock says; a key without a record starts
/// from the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_follow_the_record_not_the_clock() {
    let (Some(store), Some(mut conn)) = (shared_store().await, shared_conn().await) else {
        return;
    };
    let s = scope("fence");
    let key = Key::new("k").unwrap();
    let record = store.record_key(&s, &key);
    let first = acquire(&store, &s, &key).await;
    // Microseconds of the server's clock for a key seen for the first time.
    assert!(first.fence > 1_600_000_000_000_000, "{}", first.fence);
    store.release(&s, &key, &first).await.unwrap();
    let kept: Vec<u8> = conn.get(&record).await.unwrap();
    assert_eq!(kept, format!("F{:016}", first.fence).into_bytes());
    let second = acquire(&store, &s, &key).await;
    assert!(second.fence > first.fence);

    // A released record whose fence is far ahead of Redis's clock (as after the clock stepped
    // back): the next lease follows the record, not the clock.
    let ahead: u64 = 9_000_000_000_000_000;
    let _: () = conn.set(&record, format!("F{ahead:016}")).await.unwrap();
    let third = acquire(&store, &s, &key).await;
    assert_eq!(third.fence, ahead + 1);

    // The same for a lease that lapsed without a release (the holder crashed).
    let short = BeginRequest {
        ttl: Duration::from_millis(100),
        ..req(&s, &key)
    };
    let other = Key::new("lapsed").unwrap();
    let lapsed_req = BeginRequest {
        key: &other,
        ..short
    };
    let Begin::Acquired(lapsed) = store.begin(&lapsed_req).await.unwrap() else {
        panic!()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        match store.begin(&req(&s, &other)).await.unwrap() {
            Begin::Acquired(l) => break l,
            Begin::InFlight { .. } => {
                assert!(Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            x => panic!("{x:?}"),
        }
    };
    assert!(taken.fence > lapsed.fence);

    // Everything about the key is lost (FLUSHALL, a restart without persistence): the clock
    // still orders leases that are separated by a lease's length.
    let _: () = conn.del(&record).await.unwrap();
    let fourth = acquire(&store, &s, &key).await;
    assert!(fourth.fence > second.fence);
}

/// A store on a plain multiplexed connection works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_multiplexed_connection() {
    let Some(conn) = shared_conn().await else {
        return;
    };
    let store = RedisStore::new(conn);
    let opts = Options::with_scope(scope("multiplexed"));
    for _ in 0..2 {
        let out: Result<String, Error> = run(&store, &opts, Call::new("k"), || async {
            Ok("v".to_owned())
        })
        .await;
        assert_eq!(out.unwrap(), "v");
    }
    assert!(format!("{store:?}").contains("Multiplexed"));
}

/// A duplicate that waits for a holder in the same process is woken when the holder completes,
/// not after its polling backoff (which is hundreds of milliseconds by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_duplicate_is_woken_by_a_local_completion() {
    let Some(store) = shared_store().await else {
        return;
    };
    let opts = Options::with_scope(scope("wake")).wait(Duration::from_secs(20));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = run(&store, &opts, Call::new("k"), || async {
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(1u32)
    });
    let duplicate = async {
        started_rx.await.unwrap();
        let dup = run(&store, &opts, Call::new("k"), || async {
            Ok::<_, Error>(2u32)
        });
        let mut dup = std::pin::pin!(dup);
        // Let the duplicate wait long enough for its backoff to reach hundreds of milliseconds.
        tokio::select! {
            r = &mut dup => panic!("answered while the holder runs: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
        }
        let finished = tokio::time::Instant::now();
        finish_tx.send(()).unwrap();
        let out = dup.await;
        (out, finished.elapsed())
    };
    let (held, (dup, late)) = tokio::join!(holder, duplicate);
    assert_eq!(held.unwrap(), 1);
    assert_eq!(dup.unwrap(), 1);
    assert!(
        late < Duration::from_millis(60),
        "woken {late:?} after the completion"
    );
}
