//! The guarantees on the Redis store's rare paths, against real servers (the shared Redis, and
//! private `redis-server` processes this file starts and stops): a process that starts while
//! Redis is down, a call dropped while its done mark is blocked in Redis, a completion after the
//! record was lost, and a stale holder's write fenced off downstream.

mod redis_support;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::redis::{self, AsyncCommands};
use idem_runtime::{
    Begin, BeginRequest, Call, Error, Fingerprint, Key, Options, Phase, RedisStore, Store, Token,
    current_lease, run,
};
use redis_support::{RedisServer, free_port, shared_conn, shared_store};

fn scope(name: &str) -> String {
    format!("redis-guarantees:{name}:{}", Token::generate().to_hex())
}

fn counted(runs: &AtomicU32) -> u32 {
    runs.fetch_add(1, Ordering::SeqCst) + 1
}

/// Wait (bounded) until `f` says yes, looking every 20 ms: for state that only the server can
/// tell (no signal exists for it).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: never");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process that starts while Redis is down builds its store the documented way (`from_url`
/// used to connect at once and fail); calls fail closed meanwhile; when Redis comes up the same
/// store works, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_built_while_redis_is_down_recovers() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::from_url(&url)
        .await
        .expect("building the store needs no server");
    let opts = Options::with_scope(scope("down-at-start"));
    let runs = AtomicU32::new(0);
    let down: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async {
        Ok(counted(&runs))
    })
    .await;
    assert!(
        matches!(
            down,
            Err(Error::Unavailable {
                phase: Phase::Begin,
                ..
            })
        ),
        "{down:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "ran without a claim");

    let _server = match RedisServer::start_on(port, &[]) {
        Ok(s) => s,
        Err(redis_support::StartError::Missing(e)) => {
            return support::server_missing("redis-server", "PATH", e);
        }
        Err(e) => panic!("{e}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async {
            Ok(counted(&runs))
        })
        .await;
        if out.is_ok() || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        out.unwrap(),
        1,
        "the store never answered once Redis was up"
    );
    let again: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async {
        Ok(counted(&runs))
    })
    .await;
    assert_eq!(again.unwrap(), 1, "replayed");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The same with a layered store: while Redis is down the work goes on through the database,
/// and the front is used again once Redis is up.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layered_store_built_while_redis_is_down_works_through_the_database() {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = match idem_runtime::sqlx::PgPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => return support::server_missing("PostgreSQL", &url, e),
    };
    let durable = idem_runtime::PgStore::new(pool);
    durable.migrate().await.unwrap();
    let port = free_port();
    let front = RedisStore::from_url(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let store = idem_runtime::LayeredStore::builder(front, durable)
        .front_backoff(Duration::from_millis(100))
        .build();
    let opts = Options::with_scope(scope("layered-down-at-start"));
    let runs = AtomicU32::new(0);
    for k in 0..5u32 {
        let out: Result<u32, Error> = run(&store, &opts, Call::new(&k), || async {
            Ok(counted(&runs))
        })
        .await;
        out.expect("the database answers while Redis is down");
    }
    assert!(!store.front_available());
    assert!(store.degraded_calls() > 0);
    let _server = match RedisServer::start_on(port, &[]) {
        Ok(s) => s,
        Err(redis_support::StartError::Missing(e)) => {
            return support::server_missing("redis-server", "PATH", e);
        }
        Err(e) => panic!("{e}"),
    };
    eventually("the front is used again", || {
        let (store, opts, runs) = (&store, &opts, &runs);
        async {
            let out: Result<u32, Error> = run(store, opts, Call::new(&99u32), || async {
                Ok(counted(runs))
            })
            .await;
            out.unwrap();
            store.front_available()
        }
    })
    .await;
    for k in 0..5u32 {
        let out: Result<u32, Error> = run(&store, &opts, Call::new(&k), || async {
            Ok(counted(&runs))
        })
        .await;
        assert_eq!(out.unwrap(), k + 1, "replayed");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);
}

/// A call dropped while its done mark is blocked in Redis (a client that gave up): the mark is
/// finished in the background once Redis answers, and the redelivery replays instead of running
/// the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_while_redis_holds_the_mark_it_is_still_written() {
    let server = match RedisServer::start() {
        Ok(s) => s,
        Err(redis_support::StartError::Missing(e)) => {
            return support::server_missing("redis-server", "PATH", e);
        }
        Err(e) => panic!("{e}"),
    };
    let store = RedisStore::from_url(&server.url()).await.unwrap();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let opts = Options::with_scope(scope("cancel-mark")).ttl(Duration::from_secs(60));
    let runs = AtomicU32::new(0);
    let (ran_tx, ran_rx) = tokio::sync::oneshot::channel();
    let (paused_tx, paused_rx) = tokio::sync::oneshot::channel::<()>();
    let call = run(&store, &opts, Call::new("order-1"), || async {
        let n = counted(&runs);
        let _ = ran_tx.send(());
        // Redis stops taking writes before the handler returns: its mark will wait.
        let _ = paused_rx.await;
        Ok::<_, Error>(n)
    });
    let pause = async {
        ran_rx.await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(3000)
            .arg("WRITE")
            .query_async(&mut admin)
            .await
            .unwrap();
        paused_tx.send(()).unwrap();
    };
    // The caller gives up while the mark is blocked.
    let (gave_up, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(500), call),
        pause
    );
    assert!(gave_up.is_err(), "the call ended although Redis was paused");
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let record = store.record_key(opts.scope_str(), &Key::new("order-1").unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v: Option<Vec<u8>> = admin.get(&record).await.unwrap();
        if v.is_some_and(|v| v.first() == Some(&b'D')) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the background mark was never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again: Result<u32, Error> = run(&store, &opts, Call::new("order-1"), || async {
        Ok(counted(&runs))
    })
    .await;
    assert_eq!(again.unwrap(), 1, "replayed");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

/// A completion after Redis lost the in-flight record (a flush or restart while the handler ran)
/// writes the done record with the lease's fingerprint: another payload is refused, not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_after_the_record_was_lost_keeps_the_fingerprint() {
    let (Some(store), Some(mut conn)) = (shared_store().await, shared_conn().await) else {
        return;
    };
    let (s, k) = (scope("lost-fingerprint"), Key::new("order-1").unwrap());
    let a = Fingerprint::of(&"payload-a").unwrap();
    let req = BeginRequest {
        scope: &s,
        key: &k,
        token: Token::generate(),
        ttl: Duration::from_secs(60),
        fingerprint: Some(a),
    };
    let Begin::Acquired(lease) = store.begin(&req).await.unwrap() else {
        panic!()
    };
    let _: () = conn.del(store.record_key(&s, &k)).await.unwrap();
    store
        .complete(&s, &k, &lease, b"out", Duration::from_secs(60))
        .await
        .unwrap();
    let other = BeginRequest {
        token: Token::generate(),
        fingerprint: Some(Fingerprint::of(&"payload-b").unwrap()),
        ..req
    };
    assert_eq!(store.begin(&other).await.unwrap(), Begin::Mismatch);
}

/// The fence in the handler's hands: a holder that lost its lease (wedged past `max_lease`) and
/// was taken over has a smaller fence than the new holder, so a downstream table guarded by
/// `WHERE fence < $new` refuses its late write.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_s_downstream_write_is_refused_by_its_fence() {
    use idem_runtime::sqlx::{self, AssertSqlSafe};
    let Some(store) = shared_store().await else {
        return;
    };
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = match sqlx::PgPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => return support::server_missing("PostgreSQL", &url, e),
    };
    let shipments = format!("shipments_{}", Token::generate().to_hex());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {shipments} (order_id TEXT PRIMARY KEY, fence BIGINT NOT NULL, carrier TEXT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    // The downstream write: only a greater fence may overwrite.
    let ship = format!(
        "INSERT INTO {shipments} (order_id, fence, carrier) VALUES ($1, $2, $3)
         ON CONFLICT (order_id) DO UPDATE SET fence = EXCLUDED.fence, carrier = EXCLUDED.carrier
         WHERE {shipments}.fence < EXCLUDED.fence"
    );
    let write = {
        let (pool, ship) = (pool.clone(), ship.clone());
        move |carrier: &'static str| {
            let (pool, ship) = (pool.clone(), ship.clone());
            async move {
                let lease = current_lease().expect("inside the handler");
                let done = sqlx::query(AssertSqlSafe(ship))
                    .bind(lease.key().as_str())
                    .bind(lease.fence() as i64)
                    .bind(carrier)
                    .execute(&pool)
                    .await
                    .unwrap();
                (lease.fence(), done.rows_affected())
            }
        }
    };
    let opts = Arc::new(
        Options::with_scope(scope("fence-downstream"))
            .ttl(Duration::from_millis(200))
            .max_lease(Duration::from_millis(400)),
    );
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
    let stale = {
        let (store, opts, write) = (store.clone(), opts.clone(), write.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("order-9"), || async move {
                // Wedged until its lease is gone, then it tries to ship anyway.
                current_lease().unwrap().lost().await;
                let _ = lost_tx.send(());
                let _ = resume_rx.await;
                Ok::<_, Error>(write("stale").await)
            })
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), lost_rx)
        .await
        .expect("the lease was never lost")
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (fresh_fence, fresh_rows) = loop {
        let out: Result<(u64, u64), Error> = run(&store, &opts, Call::new("order-9"), || async {
            Ok(write("fresh").await)
        })
        .await;
        match out {
            Ok(v) => break v,
            Err(Error::InFlight { .. }) => {
                assert!(tokio::time::Instant::now() < deadline, "never taken over");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(fresh_rows, 1);
    resume_tx.send(()).unwrap();
    let late = stale.await.unwrap();
    assert!(matches!(late, Err(Error::LeaseLost { .. })), "{late:?}");
    let (carrier, fence): (String, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT carrier, fence FROM {shipments} WHERE order_id = 'order-9'"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (carrier.as_str(), fence as u64),
        ("fresh", fresh_fence),
        "the stale holder's write went through"
    );
    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {shipments}")))
        .execute(&pool)
        .await
        .unwrap();
}
