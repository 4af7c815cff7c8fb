//! The layered store (Redis in front of PostgreSQL) when Redis loses its data or dies: a private
//! `redis-server` that the tests flush, kill and restart, and the shared PostgreSQL
//! (`POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`). Effects are counted in a
//! business table without a unique key, so a second effect would show as a second row.
mod redis_support;
mod support;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_runtime::redis;
use idem_runtime::sqlx::{self, AssertSqlSafe, PgPool};
use idem_runtime::{
    Call, Error, Key, LayeredStore, Options, PgStore, Phase, RedisStore, Token, idempotent, run,
};
use redis_support::{RedisServer, start_or_skip};
use tokio::sync::Notify;

type Layered = LayeredStore<RedisStore, PgStore>;

fn postgres_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn pool() -> Option<PgPool> {
    let url = postgres_url();
    match sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            support::server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Token::generate().to_hex())
}

/// A private Redis, the shared PostgreSQL, and a business table of effects (one row per handler
/// execution: no unique key on purpose).
struct World {
    server: Mutex<RedisServer>,
    pool: PgPool,
    table: String,
    store: Layered,
}

impl World {
    async fn start() -> Option<World> {
        let pool = pool().await?;
        let server = start_or_skip()?;
        let durable = PgStore::new(pool.clone());
        durable.migrate().await.unwrap();
        let front = RedisStore::from_url(&server.url()).await.unwrap();
        let store = LayeredStore::builder(front, durable)
            .front_timeout(Duration::from_millis(200))
            .front_backoff(Duration::from_millis(200))
            .build();
        let table = unique("layered_effects");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {table} (k TEXT NOT NULL, pid INT NOT NULL)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        Some(World {
            server: Mutex::new(server),
            pool,
            table,
            store,
        })
    }

    async fn effect(&self, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (k, pid) VALUES ($1, $2)",
            self.table
        )))
        .bind(key)
        .bind(std::process::id() as i32)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    async fn effects(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(AssertSqlSafe(format!(
            "SELECT k, count(*) FROM {} GROUP BY k",
            self.table
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    async fn admin(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn url(&self) -> String {
        self.server.lock().unwrap().url()
    }

    async fn drop_table(&self) {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {}", self.table)))
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

async fn dbsize(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(admin).await.unwrap()
}

fn assert_once_each(effects: &HashMap<String, i64>, keys: impl IntoIterator<Item = String>) {
    let mut expected = 0;
    for k in keys {
        expected += 1;
        assert_eq!(effects.get(&k).copied(), Some(1), "key {k}: {effects:?}");
    }
    assert_eq!(effects.len(), expected, "effects of unexpected keys");
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Lets a test hold one handler in flight.
#[derive(Default)]
struct Hold {
    started: Notify,
    finish: Notify,
}

/// The consumer under test: `#[idempotent]` on the layered store, with a key made unique per
/// run (records of earlier runs stay in the database for their `keep`).
struct Consumer {
    world: World,
    run: String,
}

impl Consumer {
    #[idempotent(
        key = "{run}:{order}",
        store = "self.world.store",
        scope = "layered_faults::coupon",
        wait = "60s"
    )]
    async fn deliver(
        &self,
        run: &str,
        order: u32,
        hold: Option<&Hold>,
    ) -> Result<String, AppError> {
        self.world.effect(&format!("{run}:{order}")).await?;
        if let Some(hold) = hold {
            hold.started.notify_one();
            hold.finish.notified().await;
        }
        Ok(format!("coupon-{order}"))
    }

    /// The same handler, scope and key, but an in-flight duplicate is refused at once.
    #[idempotent(
        key = "{run}:{order}",
        store = "self.world.store",
        scope = "layered_faults::coupon"
    )]
    async fn deliver_now(&self, run: &str, order: u32) -> Result<String, AppError> {
        self.world.effect(&format!("{run}:{order}")).await?;
        Ok(format!("coupon-{order}"))
    }
}

/// A stream of deliveries with many duplicates, Redis flushed (`FLUSHALL`) three times in the
/// middle of it, once while a handler is in flight: exactly one effect per key, none missing, and
/// every delivery answered with the key's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushed_mid_stream_runs_each_effect_once() {
    let Some(world) = World::start().await else {
        return;
    };
    let consumer = Arc::new(Consumer {
        world,
        run: unique("run"),
    });
    let mut admin = consumer.world.admin().await;
    const ORDERS: u32 = 150;
    const COPIES: u32 = 4;
    const HELD: u32 = 1_000_000;

    // One handler held in flight across the first flush.
    let hold = Arc::new(Hold::default());
    let holder = {
        let (consumer, hold) = (consumer.clone(), hold.clone());
        tokio::spawn(async move {
            consumer
                .deliver(&consumer.run, HELD, Some(&hold))
                .await
                .unwrap()
        })
    };
    hold.started.notified().await;

    // Every order COPIES times, interleaved (a fixed shuffle: order i's copies spread out).
    let mut deliveries: Vec<u32> = (0..ORDERS * COPIES).map(|i| i % ORDERS).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..deliveries.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        deliveries.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let total = deliveries.len() as u32;
    let queue = Arc::new(Mutex::new(VecDeque::from(deliveries)));
    let processed = Arc::new(AtomicU32::new(0));
    // Flush when a quarter, half and three quarters of the stream were processed.
    let flush_at = [total / 4, total / 2, total * 3 / 4];

    let mut workers = Vec::new();
    for _ in 0..8 {
        let (consumer, queue, processed, hold) = (
            consumer.clone(),
            queue.clone(),
            processed.clone(),
            hold.clone(),
        );
        let mut admin = admin.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let Some(order) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                let out = consumer.deliver(&consumer.run, order, None).await;
                assert_eq!(out.unwrap(), format!("coupon-{order}"));
                let n = processed.fetch_add(1, Ordering::SeqCst) + 1;
                if flush_at.contains(&n) {
                    let _: () = redis::cmd("FLUSHALL")
                        .query_async(&mut admin)
                        .await
                        .unwrap();
                    if n == flush_at[0] {
                        // The front forgot the held claim; the database did not: a duplicate
                        // is refused as in flight, and its handler does not run.
                        match consumer.deliver_now(&consumer.run, HELD).await {
                            Err(AppError::Idem(Error::InFlight { .. })) => {}
                            other => panic!("expected InFlight after the flush, got {other:?}"),
                        }
                        hold.finish.notify_one();
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(holder.await.unwrap(), format!("coupon-{HELD}"));
    // The held key's duplicates replay now.
    assert_eq!(
        consumer.deliver_now(&consumer.run, HELD).await.unwrap(),
        format!("coupon-{HELD}")
    );

    let world = &consumer.world;
    let keys = (0..ORDERS)
        .chain([HELD])
        .map(|o| format!("{}:{o}", consumer.run));
    assert_once_each(&world.effects().await, keys);
    // Redis answers again after the flushes (records written or backfilled since the last one),
    // and it never was unreachable.
    assert!(dbsize(&mut admin).await > 0);
    assert_eq!(world.store.degraded_calls(), 0);
    world.drop_table().await;
}

/// Redis is killed: calls go on through the database (each effect still once, the degradation
/// counted); Redis is restarted on the same port: the same store returns to the fast path by
/// itself (records in Redis again, the degraded counter stops increasing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_work_goes_on_through_the_database() {
    #[cfg(feature = "metrics")]
    let snapshotter = {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    };
    let Some(world) = World::start().await else {
        return;
    };
    let world = Arc::new(world);
    let scope = unique("layered-kill");
    let opts = Arc::new(Options::with_scope(scope.clone()).wait(Duration::from_secs(30)));

    async fn deliver(world: &Arc<World>, opts: &Options, order: u32) -> Result<String, AppError> {
        let w = world.clone();
        run(&world.store, opts, Call::new(&order), || async move {
            w.effect(&order.to_string()).await?;
            Ok(format!("coupon-{order}"))
        })
        .await
    }

    /// `orders` delivered twice each, by 8 concurrent workers; every delivery must succeed.
    async fn stream(world: &Arc<World>, opts: &Arc<Options>, orders: std::ops::Range<u32>) -> u32 {
        let queue: VecDeque<u32> = orders.clone().chain(orders.rev()).collect();
        let calls = queue.len() as u32;
        let queue = Arc::new(Mutex::new(queue));
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (world, opts, queue) = (world.clone(), opts.clone(), queue.clone());
                tokio::spawn(async move {
                    loop {
                        let Some(order) = queue.lock().unwrap().pop_front() else {
                            return;
                        };
                        let out = deliver(&world, &opts, order).await;
                        assert_eq!(out.unwrap(), format!("coupon-{order}"));
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        calls
    }

    let mut admin = world.admin().await;
    let record = |order: u32| {
        world
            .store
            .front()
            .record_key(&scope, &Key::new(&order).unwrap())
    };

    // Up: the fast path.
    stream(&world, &opts, 0..50).await;
    assert_eq!(world.store.degraded_calls(), 0);
    assert!(dbsize(&mut admin).await >= 50);

    // Down: work goes on through the database, degraded and counted, and not slowly: the
    // front is skipped during its back-off instead of being tried (and timed out) per call.
    let port = world.server.lock().unwrap().port;
    world.server.lock().unwrap().kill();
    let started = Instant::now();
    let calls = stream(&world, &opts, 0..100).await; // 0..50 replayed, 50..100 executed
    let down_for = started.elapsed();
    let degraded = world.store.degraded_calls();
    eprintln!(
        "Redis down: {calls} calls in {down_for:?}, {degraded} degraded store operations, {} front failures",
        world.store.front_failures()
    );
    assert!(
        degraded >= u64::from(calls),
        "degraded {degraded} < {calls} calls"
    );
    assert!(!world.store.front_available());
    let probes_allowed = 8 + 2 * (down_for.as_millis() / 200) as u64;
    assert!(
        world.store.front_failures() <= probes_allowed,
        "{} front failures in {down_for:?}: the front was not skipped",
        world.store.front_failures()
    );
    // An in-flight key is still refused while Redis is down: the database holds the claim.
    {
        let hold = Arc::new(Hold::default());
        let holder = {
            let (world, opts, hold) = (world.clone(), opts.clone(), hold.clone());
            tokio::spawn(async move {
                let w = world.clone();
                run(&world.store, &opts, Call::new(&500u32), || async move {
                    w.effect("500").await?;
                    hold.started.notify_one();
                    hold.finish.notified().await;
                    Ok::<_, AppError>(500u32)
                })
                .await
            })
        };
        hold.started.notified().await;
        let now = Options::with_scope(scope.clone());
        let dup = run(&world.store, &now, Call::new(&500u32), || async {
            Ok::<_, AppError>(0u32)
        })
        .await;
        assert!(
            matches!(dup, Err(AppError::Idem(Error::InFlight { .. }))),
            "{dup:?}"
        );
        hold.finish.notify_one();
        assert_eq!(holder.await.unwrap().unwrap(), 500);
    }

    // Back: the same store, not rebuilt, returns to the fast path once its probe succeeds.
    let _restarted = RedisServer::start_on(port, &[]).expect("restart redis-server on its port");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = 1000;
    while !world.store.front_available() {
        assert!(Instant::now() < deadline, "never returned to the fast path");
        // Nothing signals that Redis is back: the store probes it on a call after its back-off.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            deliver(&world, &opts, next).await.unwrap(),
            format!("coupon-{next}")
        );
        next += 1;
    }
    let degraded = world.store.degraded_calls();
    stream(&world, &opts, 0..150).await; // 0..100 backfilled from the database, 100..150 new
    assert_eq!(
        world.store.degraded_calls(),
        degraded,
        "still degraded after Redis came back"
    );
    // Keys done while Redis was down are answered by Redis again.
    let mut admin = world.admin().await;
    for order in [0, 60, 99, 120] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(record(order))
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(exists, "order {order} has no record in Redis");
    }

    let keys = (0..150)
        .chain([500])
        .chain(1000..next)
        .map(|o| o.to_string());
    assert_once_each(&world.effects().await, keys);
    world.drop_table().await;

    // The degradation is also counted through the `metrics` facade. (The other tests of this
    // binary never degrade, so every count is this store's.)
    #[cfg(feature = "metrics")]
    {
        let mut counted = 0;
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if key.key().name() == "idem_store_degraded_total" {
                let metrics_util::debugging::DebugValue::Counter(n) = value else {
                    panic!("not a counter")
                };
                counted += n;
            }
        }
        assert_eq!(counted, world.store.degraded_calls());
    }
}

/// The transactional mode through the layered store: the effect and the done mark commit in one
/// database transaction; duplicates replay from Redis, and still from the database after Redis
/// lost everything; a failing handler rolls back and releases the key in both layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_tx_commits_the_effect_with_the_mark() {
    let Some(world) = World::start().await else {
        return;
    };
    let opts = Options::with_scope(unique("layered-tx"));
    let table = world.table.clone();
    let deliver = |order: u32, fail: bool| {
        let table = table.clone();
        world.store.run_in_tx(&opts, Call::new(&order), move |tx| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {table} (k, pid) VALUES ($1, 0)"
                )))
                .bind(order.to_string())
                .execute(&mut **tx)
                .await?;
                if fail {
                    return Err(AppError::Db(sqlx::Error::Protocol("declined".into())));
                }
                Ok(format!("coupon-{order}"))
            })
        })
    };
    let mut admin = world.admin().await;
    let in_redis = |order: u32| {
        world
            .store
            .front()
            .record_key(opts.scope_str(), &Key::new(&order).unwrap())
    };

    // A failure rolls back its write and frees the key at once.
    assert!(matches!(deliver(1, true).await, Err(AppError::Db(_))));
    assert!(world.effects().await.is_empty());
    assert_ne!(
        record_tag(&mut admin, &in_redis(1)).await,
        Some(b'I'),
        "the front still holds the failed call's claim"
    );

    for _ in 0..3 {
        assert_eq!(deliver(1, false).await.unwrap(), "coupon-1");
    }
    assert_eq!(
        record_tag(&mut admin, &in_redis(1)).await,
        Some(b'D'),
        "the done mark was not copied to Redis after the commit"
    );
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(deliver(1, false).await.unwrap(), "coupon-1");
    assert_once_each(&world.effects().await, ["1".to_owned()]);
    world.drop_table().await;
}

/// With the database unreachable the layered store fails closed, even though Redis is up: the
/// handler does not run, and the error says the store is unavailable.
#[tokio::test]
async fn database_down_fails_closed() {
    let Some(server) = start_or_skip() else {
        return;
    };
    // Nothing listens on port 1: every database call fails.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let front = RedisStore::from_url(&server.url()).await.unwrap();
    let store = LayeredStore::new(front, PgStore::new(pool));
    let runs = AtomicU32::new(0);
    let out: Result<u32, Error> = run(&store, &Options::new("db-down"), Call::new("k"), || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(1)
    })
    .await;
    assert!(
        matches!(
            out,
            Err(Error::Unavailable {
                phase: Phase::Begin,
                ..
            })
        ),
        "{out:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // The front's claim was given back: Redis holds nothing for the key.
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let record = store.front().record_key("db-down", &Key::new("k").unwrap());
    assert_ne!(record_tag(&mut admin, &record).await, Some(b'I'));
}

/// The state of a record in Redis: `I` in flight, `F` released, `D` done; `None` when absent.
async fn record_tag(admin: &mut redis::aio::MultiplexedConnection, record: &str) -> Option<u8> {
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(record)
        .query_async(admin)
        .await
        .unwrap();
    value.and_then(|v| v.first().copied())
}
