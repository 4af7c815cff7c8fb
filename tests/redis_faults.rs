//! Faults the Redis store must survive, with real servers the tests start and kill: Redis killed
//! while a handler runs, a lease renewed through a slow handler and one taken over, and the script
//! cache flushed mid-run.
mod redis_support;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::redis::{self, AsyncCommands};
use idem_runtime::{Call, Error, Key, Options, Phase, RedisStore, Token, run};
use redis_support::{RedisServer, shared_conn, shared_store, start_or_skip};
use tokio::sync::oneshot;
use tokio::time::Instant;

fn scope(name: &str) -> String {
    format!("idem-faults:{name}:{}", Token::generate().to_hex())
}

async fn counted(runs: &AtomicU32, v: u32) -> Result<u32, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(v)
}

/// Redis is SIGKILLed while a handler holds its key: new calls fail closed with a typed
/// `Unavailable` in the begin phase and do not run their handler; the running handler's completion
/// reports a typed `Unavailable` in the complete phase; once Redis is back (empty, on the same
/// port) the same store serves calls again, without a restart of the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_while_a_handler_runs() {
    let Some(mut server) = start_or_skip() else {
        return;
    };
    let port = server.port;
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let opts = Arc::new(Options::with_scope(scope("kill")).ttl(Duration::from_secs(3)));

    let runs = Arc::new(AtomicU32::new(0));
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let holder = {
        let (store, opts, runs) = (store.clone(), opts.clone(), runs.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("held"), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<_, Error>(1u32)
            })
            .await
        })
    };
    started_rx.await.unwrap();
    server.kill();

    // New calls: typed error, handler not run (fail closed).
    let refused = AtomicU32::new(0);
    for key in ["new-1", "new-2", "held"] {
        let out = run(&store, &opts, Call::new(key), || counted(&refused, 2)).await;
        match out {
            Err(Error::Unavailable {
                phase: Phase::Begin,
                ..
            }) => {}
            other => panic!("expected Unavailable in begin, got {other:?}"),
        }
    }
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "a handler ran without the store"
    );

    // The running handler finishes: its done mark cannot be written, and it says so.
    finish_tx.send(()).unwrap();
    match holder.await.unwrap() {
        Err(Error::Unavailable {
            phase: Phase::Complete,
            ..
        }) => {}
        other => panic!("expected Unavailable in complete, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Redis comes back (empty: no persistence, no scripts cached). The same store recovers by
    // itself; a call made while it reconnects may still fail closed, never run twice.
    let _server = RedisServer::start_on(port, &[]).expect("restart redis-server on its port");
    let resumed = AtomicU32::new(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match run(&store, &opts, Call::new("after"), || counted(&resumed, 3)).await {
            Ok(v) => {
                assert_eq!(v, 3);
                break;
            }
            Err(Error::Unavailable {
                phase: Phase::Begin,
                ..
            }) if Instant::now() < deadline => {
                // Nothing signals the manager's reconnection; ask again shortly.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
    assert_eq!(resumed.load(Ordering::SeqCst), 1);
    // And it is the real thing again: a duplicate replays.
    let again = run(&store, &opts, Call::new("after"), || counted(&resumed, 4)).await;
    assert_eq!(again.unwrap(), 3);
    assert_eq!(resumed.load(Ordering::SeqCst), 1);
}

/// A handler that runs for many lease lengths keeps its lease: the record is renewed (its TTL
/// never runs out and never exceeds one ttl) and duplicates meanwhile are refused, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_lease() {
    let (Some(store), Some(mut conn)) = (shared_store().await, shared_conn().await) else {
        return;
    };
    let ttl = Duration::from_millis(400);
    let opts = Options::with_scope(scope("renew")).ttl(ttl);
    let record = store.record_key(opts.scope_str(), &Key::new("slow").unwrap());
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let slow = run(&store, &opts, Call::new("slow"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(7u32)
    });
    let watch = async {
        started_rx.await.unwrap();
        // Five lease lengths: without renewal the lease would have expired four times.
        let until = Instant::now() + ttl * 5;
        let mut checks = 0;
        while Instant::now() < until {
            tokio::time::sleep(ttl / 4).await;
            // In flight, with a lease that ends within one ttl (renewed, never longer).
            let dup = run(&store, &opts, Call::new("slow"), || counted(&runs, 8)).await;
            match dup {
                Err(Error::InFlight { retry_after, .. }) => assert!(
                    !retry_after.is_zero() && retry_after <= ttl,
                    "lease ends in {retry_after:?}"
                ),
                other => panic!("{other:?}"),
            }
            let value: Vec<u8> = conn.get(&record).await.unwrap();
            assert_eq!(value[0], b'I');
            checks += 1;
        }
        assert!(checks >= 10);
        finish_tx.send(()).unwrap();
    };
    let (out, ()) = tokio::join!(slow, watch);
    assert_eq!(out.unwrap(), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A holder whose lease is taken over (the test expires it by hand, as a long GC pause or a
/// partition would) gets `LeaseLost` when it completes, and the record of the new holder is left
/// exactly as that holder wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_holder_gets_lease_lost() {
    let (Some(store), Some(mut conn)) = (shared_store().await, shared_conn().await) else {
        return;
    };
    let opts = Options::with_scope(scope("takeover")).ttl(Duration::from_millis(600));
    let record = store.record_key(opts.scope_str(), &Key::new("contested").unwrap());
    let runs = AtomicU32::new(0);
    let (started_tx, started_rx) = oneshot::channel();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let old = run(&store, &opts, Call::new("contested"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = started_tx.send(());
        let _ = finish_rx.await;
        Ok::<_, Error>(String::from("old holder"))
    });
    let takeover = async {
        started_rx.await.unwrap();
        // The old holder's lease lapses.
        let _: bool = conn.pexpire(&record, 1).await.unwrap();
        // A redelivery takes the key over and completes it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let new = loop {
            match run(&store, &opts, Call::new("contested"), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(String::from("new holder"))
            })
            .await
            {
                Ok(v) => break v,
                Err(Error::InFlight { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("takeover failed: {e}"),
            }
        };
        assert_eq!(new, "new holder");
        let written: Vec<u8> = conn.get(&record).await.unwrap();
        let ttl: i64 = conn.pttl(&record).await.unwrap();
        finish_tx.send(()).unwrap();
        (written, ttl)
    };
    let (old, (written, _)) = tokio::join!(old, takeover);
    match old {
        Err(Error::LeaseLost { .. }) => {}
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    // Untouched: same bytes, and a duplicate replays the new holder's output.
    let now: Vec<u8> = conn.get(&record).await.unwrap();
    assert_eq!(now, written);
    let dup: Result<String, Error> = run(&store, &opts, Call::new("contested"), || async {
        Ok(String::from("third"))
    })
    .await;
    assert_eq!(dup.unwrap(), "new holder");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// `SCRIPT FLUSH` over and over while calls run: not one call fails, and the fallback was used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flushed_mid_run() {
    let Some(server) = start_or_skip() else {
        return;
    };
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let opts = Arc::new(Options::with_scope(scope("flush")));
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (stop, mut admin) = (stop.clone(), admin.clone());
        tokio::spawn(async move {
            let mut flushes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let _: () = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                flushes += 1;
                tokio::task::yield_now().await;
            }
            flushes
        })
    };
    const KEYS: u32 = 300;
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for worker in 0..16u32 {
        let (store, opts, runs) = (store.clone(), opts.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Every key twice per worker: first calls, waits and replays all hit the flushes.
            for round in 0..2 {
                for k in (0..KEYS).filter(|k| k % 16 == (worker + round) % 16 || k % 3 == 0) {
                    let opts = (*opts).clone().wait(Duration::from_secs(10));
                    let out = run(&store, &opts, Call::new(&k), || counted(&runs, k)).await;
                    match out {
                        Ok(v) => assert_eq!(v, k),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let flushes = flusher.await.unwrap();
    assert!(failures.is_empty(), "calls failed: {failures:?}");
    assert_eq!(runs.load(Ordering::SeqCst), KEYS, "each key runs once");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(flushes > 10, "only {flushes} flushes happened");
    assert!(
        stats.contains("cmdstat_eval:"),
        "the EVAL fallback never ran: {stats}"
    );
}

/// Keeps a Redis server busy for `for_` with a script that loops (Redis runs one command at a
/// time): every request sent meanwhile waits in its queue. Returns when the script ends.
async fn busy(url: &str, for_: Duration) {
    let client = redis::Client::open(url).unwrap();
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let script = "local t0 = redis.call('TIME') \
        local function ms(t) return t[1] * 1000 + math.floor(t[2] / 1000) end \
        while ms(redis.call('TIME')) - ms(t0) < tonumber(ARGV[1]) do end \
        return 1";
    let _: i64 = redis::cmd("EVAL")
        .arg(script)
        .arg(0)
        .arg(for_.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Review finding: a claim whose reply never arrives kept the key for the whole ttl, held by no
/// one. (a) The reply takes longer than the response timeout (1 s): the caller gets
/// `Unavailable { phase: Begin }` (the handler did not run) but the script runs later and claims
/// the key; (b) the caller is cancelled while the claim waits. Either way the redelivery got
/// `InFlight` with ~600 s to wait while nothing ran. The claim's token is now given back (again,
/// for a while, since the request may land after a first release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_never_arrives_is_given_back() {
    let Some(server) = start_or_skip() else {
        return;
    };
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let opts = Options::with_scope(scope("lost-reply")).ttl(Duration::from_secs(600));
    // Connected before the server is made busy.
    let warm: Result<u32, Error> =
        run(&store, &opts, Call::new("warm-up"), || async { Ok(0) }).await;
    warm.unwrap();
    for (case, key) in [("timed out", "order-1"), ("cancelled", "order-2")] {
        let url = server.url();
        let blocker = tokio::spawn(async move { busy(&url, Duration::from_millis(2500)).await });
        // Give the busy script a head start (it must be running before our claim is queued).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let claim = run(&store, &opts, Call::new(key), || async {
            Ok::<u32, Error>(1)
        });
        match case {
            "timed out" => match claim.await {
                Err(Error::Unavailable {
                    phase: Phase::Begin,
                    ..
                }) => {}
                other => panic!("{case}: {other:?}"),
            },
            _ => assert!(
                tokio::time::timeout(Duration::from_millis(300), claim)
                    .await
                    .is_err(),
                "{case}: the claim was answered while Redis was busy"
            ),
        }
        blocker.await.unwrap();
        // The queued claim has run by now; its token must be given back.
        let runs = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match run(&store, &opts, Call::new(key), || counted(&runs, 2)).await {
                Ok(v) => break assert_eq!(v, 2),
                Err(Error::InFlight { retry_after, .. }) if Instant::now() < deadline => {
                    assert!(retry_after > Duration::from_secs(60), "{retry_after:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{case}: the key is held by no one: {other:?}"),
            }
        }
    }
}

/// Review finding: the release after `Err` was tried once. When that one request failed (the
/// server dropped its clients while the handler ran, as in a failover or a proxy reset), idem
/// logged a warning and the key stayed claimed until the lease ended although the store had
/// reconnected. It is now retried, as the done mark is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_fails_is_retried() {
    let Some(server) = start_or_skip() else {
        return;
    };
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let opts = Options::with_scope(scope("release-retry")).ttl(Duration::from_secs(600));
    let url = server.url();
    let failed: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async move {
        // Every client of the server is dropped while the handler runs.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
            .query_async(&mut admin)
            .await
            .unwrap();
        Err(Error::InvalidKey {
            reason: "the handler failed",
        })
    })
    .await;
    assert!(
        matches!(failed, Err(Error::InvalidKey { .. })),
        "{failed:?}"
    );
    let runs = AtomicU32::new(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match run(&store, &opts, Call::new("order-1"), || counted(&runs, 2)).await {
            Ok(v) => break assert_eq!(v, 2),
            Err(Error::InFlight { .. } | Error::Unavailable { .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("the key stayed held after its release failed: {other:?}"),
        }
    }
}
