//! A handler that blocks its thread must cost no one their lease.
//!
//! Leases used to be renewed in the handler's own task: a handler that blocked its worker
//! (synchronous I/O, CPU work between awaits, `std::thread::sleep`) was never renewed, and neither
//! were the handlers whose tasks waited on that worker; a duplicate took the lapsed lease and ran
//! (two effects, seen on RabbitMQ and JetStream). Renewal now runs on idem's own thread.
//!
//! Each test: one handler blocks its worker for 3 × ttl while 10 other calls are in flight on the
//! same runtime (2 workers, and a `current_thread` runtime, where the one thread is blocked);
//! 2 × ttl in, a duplicate of each of the 11 keys arrives from another thread (another
//! "process"): every duplicate must be deferred, and each key's effect happens once. Run on the
//! memory store, Redis, PostgreSQL and the layered store.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use idem_runtime::{Call, Error, MemoryStore, Options, Store, run};

const TTL: Duration = Duration::from_millis(300);
const OTHERS: usize = 10;

/// What one run of the scenario counted.
#[derive(Debug)]
struct Counts {
    deferred: usize,
    effects: Vec<u32>,
    duplicates_ran: u32,
}

/// Run the scenario: `make_store` builds a store handle inside the runtime that uses it (the
/// handlers' runtime, and the duplicates' own).
fn scenario(
    name: &str,
    multi_thread: bool,
    make_store: impl Fn() -> Arc<dyn Store> + Send + Sync + 'static,
) -> Counts {
    let make_store = Arc::new(make_store);
    let opts = Arc::new(
        Options::with_scope(format!(
            "blocking:{name}:{}",
            idem_runtime::Token::generate().to_hex()
        ))
        .ttl(TTL),
    );
    let effects: Arc<Vec<AtomicU32>> = Arc::new((0..=OTHERS).map(|_| AtomicU32::new(0)).collect());
    let (started_tx, started_rx) = mpsc::channel::<usize>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);

    // The handlers' runtime, on a thread of its own.
    let handlers = {
        let (make_store, opts, effects) = (make_store.clone(), opts.clone(), effects.clone());
        std::thread::spawn(move || {
            let rt = if multi_thread {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            }
            .unwrap();
            let store = {
                let _in = rt.enter();
                make_store()
            };
            rt.block_on(async move {
                // The blocker blocks only once the others are in flight (on a current_thread
                // runtime nothing else could start while it blocks).
                let others_started = Arc::new(tokio::sync::Semaphore::new(0));
                let mut tasks = Vec::new();
                for i in 0..OTHERS {
                    let (store, opts, effects, started, mut release, others_started) = (
                        store.clone(),
                        opts.clone(),
                        effects.clone(),
                        started_tx.clone(),
                        release_rx.clone(),
                        others_started.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        let out: Result<usize, Error> =
                            run(&store, &opts, Call::new(&i), || async {
                                effects[i].fetch_add(1, Ordering::SeqCst);
                                started.send(i).unwrap();
                                others_started.add_permits(1);
                                // In flight until the test has checked every duplicate.
                                while !*release.borrow_and_update() {
                                    release.changed().await.unwrap();
                                }
                                Ok(i)
                            })
                            .await;
                        out
                    }));
                }
                let blocker = {
                    let (store, opts, effects, started) = (
                        store.clone(),
                        opts.clone(),
                        effects.clone(),
                        started_tx.clone(),
                    );
                    tokio::spawn(async move {
                        run(&store, &opts, Call::new(&OTHERS), || async {
                            effects[OTHERS].fetch_add(1, Ordering::SeqCst);
                            let _all = others_started.acquire_many(OTHERS as u32).await;
                            started.send(OTHERS).unwrap();
                            // Synchronous work that never yields: this worker thread is gone.
                            std::thread::sleep(TTL * 3);
                            Ok::<_, Error>(OTHERS)
                        })
                        .await
                    })
                };
                let mut outs = vec![blocker.await.unwrap()];
                for t in tasks {
                    outs.push(t.await.unwrap());
                }
                outs
            })
        })
    };

    // The duplicates' runtime and store, connected before the clock starts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = {
        let _in = rt.enter();
        make_store()
    };
    let warm: Result<u8, Error> =
        rt.block_on(run(&store, &opts, Call::new("warm-up"), || async { Ok(0) }));
    warm.expect("the duplicates' store answers");
    // Everyone is in flight (the blocker included) ...
    let mut started = 0;
    while started <= OTHERS {
        started_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a handler never started");
        started += 1;
    }
    // ... and stays so past two ttls: without renewal every lease would have lapsed by now.
    std::thread::sleep(TTL * 2);
    let duplicates_ran = Arc::new(AtomicU32::new(0));
    let ran = duplicates_ran.clone();
    let deferred = rt.block_on(async move {
        let mut deferred = 0;
        // The blocker's key first: it is the one whose time runs out.
        for i in std::iter::once(OTHERS).chain(0..OTHERS) {
            let ran = &ran;
            let dup: Result<usize, Error> = run(&store, &opts, Call::new(&i), || async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(i)
            })
            .await;
            match dup {
                Err(Error::InFlight { .. }) => deferred += 1,
                other => eprintln!("duplicate of key {i} was not deferred: {other:?}"),
            }
        }
        deferred
    });
    release_tx.send(true).unwrap();
    let outs = handlers.join().expect("the handlers' thread panicked");
    for out in outs {
        out.expect("a handler's call failed");
    }
    let counts = Counts {
        deferred,
        effects: effects.iter().map(|e| e.load(Ordering::SeqCst)).collect(),
        duplicates_ran: duplicates_ran.load(Ordering::SeqCst),
    };
    eprintln!(
        "{name} ({}): {} of {} duplicates deferred; effects per key {:?}; duplicates that ran: {}",
        if multi_thread {
            "2 workers"
        } else {
            "current_thread"
        },
        counts.deferred,
        OTHERS + 1,
        counts.effects,
        counts.duplicates_ran
    );
    counts
}

fn assert_once_each(c: &Counts) {
    assert_eq!(c.deferred, OTHERS + 1, "{c:?}");
    assert_eq!(c.duplicates_ran, 0, "{c:?}");
    assert!(c.effects.iter().all(|&e| e == 1), "{c:?}");
}

#[test]
fn memory_a_blocked_worker_costs_no_lease() {
    let store = MemoryStore::new();
    let s = store.clone();
    assert_once_each(&scenario("memory", true, move || Arc::new(s.clone())));
    let s = store.clone();
    assert_once_each(&scenario("memory", false, move || Arc::new(s.clone())));
}

#[cfg(feature = "redis")]
fn redis_store() -> Option<impl Fn() -> Arc<dyn Store> + Send + Sync + 'static> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    if let Err(e) = redis_reachable(&url) {
        support::server_missing("Redis", &url, e);
        return None;
    }
    Some(move || -> Arc<dyn Store> {
        let client = idem_runtime::redis::Client::open(url.as_str()).unwrap();
        Arc::new(
            idem_runtime::RedisStore::builder_from_client(client)
                .unwrap()
                .build(),
        )
    })
}

#[cfg(feature = "redis")]
fn redis_reachable(url: &str) -> Result<(), idem_runtime::redis::RedisError> {
    let client = idem_runtime::redis::Client::open(url)?;
    let mut conn = client.get_connection()?;
    idem_runtime::redis::cmd("PING").exec(&mut conn)
}

#[cfg(feature = "redis")]
#[test]
fn redis_a_blocked_worker_costs_no_lease() {
    let Some(make) = redis_store() else { return };
    let make = Arc::new(make);
    let m = make.clone();
    assert_once_each(&scenario("redis", true, move || m()));
    assert_once_each(&scenario("redis", false, move || make()));
}

#[cfg(feature = "postgres")]
fn postgres_store() -> Option<impl Fn() -> idem_runtime::PgStore + Send + Sync + 'static + Clone> {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let migrated = rt.block_on(async {
        let pool = idem_runtime::sqlx::PgPool::connect(&url).await?;
        idem_runtime::PgStore::new(pool).migrate().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    if let Err(e) = migrated {
        support::server_missing("PostgreSQL", &url, e);
        return None;
    }
    Some(move || {
        idem_runtime::PgStore::new(idem_runtime::sqlx::PgPool::connect_lazy(&url).unwrap())
    })
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_a_blocked_worker_costs_no_lease() {
    let Some(make) = postgres_store() else { return };
    let m = make.clone();
    assert_once_each(&scenario("postgres", true, move || Arc::new(m())));
    assert_once_each(&scenario("postgres", false, move || Arc::new(make())));
}

#[cfg(all(feature = "redis", feature = "postgres"))]
#[test]
fn layered_a_blocked_worker_costs_no_lease() {
    let (Some(front), Some(durable)) = (redis_store(), postgres_store()) else {
        return;
    };
    let make = Arc::new(move || -> Arc<dyn Store> {
        Arc::new(idem_runtime::LayeredStore::new(front(), durable()))
    });
    let m = make.clone();
    assert_once_each(&scenario("layered", true, move || m()));
    assert_once_each(&scenario("layered", false, move || make()));
}
