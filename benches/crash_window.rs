//! The crash window, measured: how often a consumer killed with SIGKILL at random moments applies
//! an effect twice, for four ways of writing the consumer, side by side in the same run.
//!
//! ```text
//! cargo bench -p idem-benches --features redis,postgres --bench crash_window
//! IDEM_SEED=12345 cargo bench -p idem-benches --features redis,postgres --bench crash_window   # replay a schedule
//! ```
//!
//! Each consumer drains a queue table in PostgreSQL (`seq`, `msg_key`, `acked`): `IDEM_CRASH_KEYS`
//! keys (default 1500) × `IDEM_CRASH_COPIES` copies (default 3), shuffled. `IDEM_CRASH_WORKERS`
//! worker processes (default 3; this binary, re-executed with `IDEM_CRASH_WORKER` set) pick
//! unacknowledged messages, handle them, and acknowledge them (`UPDATE … SET acked = 1`). The
//! effect is an `INSERT` into an effects table **without** a unique key, followed by a random
//! pause of 0-40 ms inside the handler so that kills land between the effect and the done mark.
//! Leases and locks last 1 s, so a killed holder's keys are free again soon. The parent kills a
//! random worker with SIGKILL every 30-300 ms (`IDEM_CRASH_INTERVAL_MS=30-300`), restarts it at
//! once, `IDEM_CRASH_KILLS` times (default 60) or until every message is acknowledged, whichever
//! comes first, then lets the workers finish.
//!
//! The consumers:
//!
//! 1. **hand-written lock** (what the articles do): `SET lock:{key} token NX EX 1`; not acquired:
//!    acknowledge if `GET done:{key}` finds it done, else leave the message for later; acquired:
//!    `GET done:{key}` (acknowledge if done), the effect, `SET done:{key} 1 EX 86400`, a Lua
//!    compare-and-delete of the lock, acknowledge;
//! 2. **`#[idempotent]` on a `RedisStore`**: the effect is the body; `Ok`: acknowledge;
//!    `InFlight`: leave for later (any other error too, reported on stderr);
//! 3. **`#[idempotent]` on a `LayeredStore`** (Redis in front of PostgreSQL): the same;
//! 4. **`#[idempotent(tx = "tx")]` on a `PgStore`**: the effect goes through the caller's
//!    transaction (`pool.begin()`, the call, `commit`), then the acknowledgement.
//!
//! The first three make the effect on a connection of its own (autocommit), so a kill between the
//! effect and the done mark leaves the effect in place while the key is not done: once the lock or
//! lease lapses, the redelivery applies it again. The fourth writes the done mark in the effect's
//! transaction: a kill rolls both back.
//!
//! Every consumer gets the same stream and the same kill schedule (both from the seed printed at
//! the start; `IDEM_SEED` replays it, timings aside). It prints, per consumer: messages, keys,
//! kills, handler runs (the body started, counted in a file just before the effect: for the
//! transactional consumer, runs minus effect rows are the runs a kill rolled back), effect rows,
//! keys with two or more effects ("doubles"; a key can get three), doubles per 100 kills, keys
//! without an effect (asserted to be 0), and the wall time. `IDEM_CRASH_ONLY=lock,redis,layered,tx` narrows the run. Tables
//! and Redis keys carry a random run id and are removed at the end. PostgreSQL at `POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), Redis at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_runtime::redis;
use idem_runtime::sqlx::postgres::{PgPool, PgPoolOptions};
use idem_runtime::sqlx::{self, AssertSqlSafe};
use idem_runtime::{LayeredStore, PgStore, RedisStore, Token, idempotent};

/// Set in a worker process: which consumer it is.
const WORKER_ENV: &str = "IDEM_CRASH_WORKER";
/// Set in a worker process: what it works on (comma-separated).
const ARGS_ENV: &str = "IDEM_CRASH_WORKER_ARGS";
/// How long one consumer may take to drain its queue before the run is declared stuck.
const DEADLINE: Duration = Duration::from_secs(180);
/// Messages a worker picks at a time.
const BATCH: i64 = 8;
/// The longest pause inside the handler after the effect, in ms (inclusive).
const MAX_PAUSE_MS: u64 = 40;
/// How long a worker waits when a whole batch was left for later (all in flight elsewhere).
const IDLE: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Consumer {
    Lock,
    Redis,
    Layered,
    Tx,
}

impl Consumer {
    const ALL: [Consumer; 4] = [
        Consumer::Lock,
        Consumer::Redis,
        Consumer::Layered,
        Consumer::Tx,
    ];

    fn role(self) -> &'static str {
        match self {
            Consumer::Lock => "lock",
            Consumer::Redis => "redis",
            Consumer::Layered => "layered",
            Consumer::Tx => "tx",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Consumer::Lock => "hand-written lock (Redis SET NX EX)",
            Consumer::Redis => "#[idempotent] on RedisStore",
            Consumer::Layered => "#[idempotent] on LayeredStore (Redis + PG)",
            Consumer::Tx => "#[idempotent(tx)] on PgStore",
        }
    }

    fn from_role(role: &str) -> Option<Consumer> {
        Consumer::ALL.into_iter().find(|c| c.role() == role)
    }

    /// Whether it keeps idem records in a PostgreSQL table.
    fn idem_table(self) -> bool {
        matches!(self, Consumer::Layered | Consumer::Tx)
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), so a schedule can be replayed with `IDEM_SEED`.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

fn pg_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Counts one run of the handler's body (just before its effect) in a file shared by the workers:
/// one `write` of one line with `O_APPEND`, outside any transaction.
fn count_run(runs: &Path, key: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(runs)
        .expect("the runs file");
    f.write_all(format!("{key}\n").as_bytes())
        .expect("the runs file");
}

/// The effect, on whatever connection it is given: one row per execution, no unique key.
fn insert_effect(effects: &str) -> String {
    format!("INSERT INTO {effects} (msg_key, worker) VALUES ($1, $2)")
}

/// What a worker process works on.
#[derive(Debug, Clone)]
struct Job {
    queue: String,
    effects: String,
    /// The idem table (layered, tx), or `-`.
    idem_table: String,
    /// What every Redis key of this consumer starts with.
    redis_prefix: String,
    /// Messages in the queue.
    total: u64,
}

impl Job {
    /// Where the workers count the runs of the handler's body.
    fn runs_file(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.runs", self.effects))
    }

    fn to_args(&self, me: usize, seed: u64) -> String {
        [
            self.queue.clone(),
            self.effects.clone(),
            self.idem_table.clone(),
            self.redis_prefix.clone(),
            self.total.to_string(),
            me.to_string(),
            seed.to_string(),
        ]
        .join(",")
    }

    fn from_args(args: &str) -> (Job, i64, u64) {
        let a: Vec<&str> = args.split(',').collect();
        assert_eq!(a.len(), 7, "worker arguments: {args:?}");
        let job = Job {
            queue: a[0].to_owned(),
            effects: a[1].to_owned(),
            idem_table: a[2].to_owned(),
            redis_prefix: a[3].to_owned(),
            total: a[4].parse().unwrap(),
        };
        (job, a[5].parse().unwrap(), a[6].parse().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// The worker processes
// ---------------------------------------------------------------------------------------------

/// 2. The attribute on a Redis store: the effect on its own connection, then the pause.
#[idempotent(key = "key", store = "store", scope = "crash_window.redis", ttl = "1s")]
async fn apply_on_redis(
    store: &RedisStore,
    pool: &PgPool,
    effects: &str,
    runs: &Path,
    key: &str,
    me: i64,
    pause: Duration,
) -> Result<i64, AppError> {
    count_run(runs, key);
    sqlx::query(AssertSqlSafe(insert_effect(effects)))
        .bind(key)
        .bind(me)
        .execute(pool)
        .await?;
    tokio::time::sleep(pause).await;
    Ok(me)
}

/// 3. The attribute on the layered store: the same body.
#[idempotent(
    key = "key",
    store = "store",
    scope = "crash_window.layered",
    ttl = "1s"
)]
async fn apply_on_layered(
    store: &LayeredStore<RedisStore, PgStore>,
    pool: &PgPool,
    effects: &str,
    runs: &Path,
    key: &str,
    me: i64,
    pause: Duration,
) -> Result<i64, AppError> {
    count_run(runs, key);
    sqlx::query(AssertSqlSafe(insert_effect(effects)))
        .bind(key)
        .bind(me)
        .execute(pool)
        .await?;
    tokio::time::sleep(pause).await;
    Ok(me)
}

/// 4. The transactional attribute: the effect goes through the caller's transaction, in which the
/// done mark is written too.
#[idempotent(
    key = "key",
    tx = "tx",
    store = "store",
    scope = "crash_window.tx",
    ttl = "1s"
)]
async fn apply_in_tx(
    store: &PgStore,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    effects: &str,
    runs: &Path,
    key: &str,
    me: i64,
    pause: Duration,
) -> Result<i64, AppError> {
    // Counted outside the transaction: every run, also the ones a kill rolls back.
    count_run(runs, key);
    sqlx::query(AssertSqlSafe(insert_effect(effects)))
        .bind(key)
        .bind(me)
        .execute(&mut **tx)
        .await?;
    tokio::time::sleep(pause).await;
    Ok(me)
}

/// What the attribute's answer means for the message: `Ok` (done now or before) acknowledges it;
/// `InFlight` leaves it for later; any other error is reported, and leaves it for later too.
fn acked(out: Result<i64, AppError>) -> Result<bool, AppError> {
    match out {
        Ok(_) => Ok(true),
        Err(AppError::Idem(idem_runtime::Error::InFlight { .. })) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One worker's consumer.
enum Handler {
    Lock {
        conn: redis::aio::MultiplexedConnection,
        prefix: String,
        unlock: redis::Script,
    },
    Redis(RedisStore),
    Layered(LayeredStore<RedisStore, PgStore>),
    Tx(PgStore),
}

impl Handler {
    /// Handle one message; `Ok(true)`: acknowledge it, `Ok(false)`: leave it for later.
    async fn handle(
        &mut self,
        pool: &PgPool,
        effects: &str,
        runs: &Path,
        key: &str,
        me: i64,
        pause: Duration,
    ) -> Result<bool, AppError> {
        match self {
            Handler::Lock {
                conn,
                prefix,
                unlock,
            } => {
                let lock = format!("{prefix}lock:{key}");
                let done = format!("{prefix}done:{key}");
                let token = Token::generate().to_hex();
                let acquired: Option<String> = redis::cmd("SET")
                    .arg(&lock)
                    .arg(&token)
                    .arg("NX")
                    .arg("EX")
                    .arg(1)
                    .query_async(conn)
                    .await?;
                let is_done: Option<String> =
                    redis::cmd("GET").arg(&done).query_async(conn).await?;
                if acquired.is_none() {
                    // Done: a duplicate, acknowledge. Otherwise in flight elsewhere: later.
                    return Ok(is_done.is_some());
                }
                if is_done.is_none() {
                    count_run(runs, key);
                    sqlx::query(AssertSqlSafe(insert_effect(effects)))
                        .bind(key)
                        .bind(me)
                        .execute(pool)
                        .await?;
                    tokio::time::sleep(pause).await;
                    let _: () = redis::cmd("SET")
                        .arg(&done)
                        .arg(1)
                        .arg("EX")
                        .arg(86_400)
                        .query_async(conn)
                        .await?;
                }
                let _: i64 = unlock.key(&lock).arg(&token).invoke_async(conn).await?;
                Ok(true)
            }
            Handler::Redis(store) => {
                acked(apply_on_redis(store, pool, effects, runs, key, me, pause).await)
            }
            Handler::Layered(store) => {
                acked(apply_on_layered(store, pool, effects, runs, key, me, pause).await)
            }
            Handler::Tx(store) => {
                let mut tx = pool.begin().await?;
                match apply_in_tx(store, &mut tx, effects, runs, key, me, pause).await {
                    Ok(_) => {
                        tx.commit().await?;
                        Ok(true)
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        acked(Err(e))
                    }
                }
            }
        }
    }
}

async fn run_worker(consumer: Consumer, job: Job, me: i64, seed: u64) {
    let mut rng = Rng::seeded(seed);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url())
        .await
        .expect("the parent reached PostgreSQL");
    let redis_store = || {
        RedisStore::builder_from_client(redis::Client::open(redis_url().as_str()).unwrap())
            .unwrap()
            .prefix(job.redis_prefix.clone())
            .build()
    };
    let mut handler = match consumer {
        Consumer::Lock => Handler::Lock {
            conn: redis::Client::open(redis_url().as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .expect("the parent reached Redis"),
            prefix: job.redis_prefix.clone(),
            unlock: redis::Script::new(
                r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#,
            ),
        },
        Consumer::Redis => Handler::Redis(redis_store()),
        Consumer::Layered => Handler::Layered(LayeredStore::new(
            redis_store(),
            PgStore::with_table(pool.clone(), &job.idem_table).unwrap(),
        )),
        Consumer::Tx => Handler::Tx(PgStore::with_table(pool.clone(), &job.idem_table).unwrap()),
    };
    let pick = format!(
        "SELECT seq, msg_key FROM {} WHERE acked = 0 AND seq >= $1 ORDER BY seq LIMIT {BATCH}",
        job.queue
    );
    let ack = format!("UPDATE {} SET acked = 1 WHERE seq = $1", job.queue);
    let runs = job.runs_file();
    loop {
        // Start at a random place, so that workers pick the same messages at times (concurrent
        // duplicates) and messages far apart at others; wrap around to the start.
        let from = rng.below(job.total) as i64;
        let mut batch: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(pick.clone()))
            .bind(from)
            .fetch_all(&pool)
            .await
            .unwrap();
        if batch.is_empty() {
            batch = sqlx::query_as(AssertSqlSafe(pick.clone()))
                .bind(0_i64)
                .fetch_all(&pool)
                .await
                .unwrap();
        }
        if batch.is_empty() {
            return; // everything is acknowledged
        }
        let mut acked = 0;
        for (seq, key) in batch {
            let pause = Duration::from_millis(rng.below(MAX_PAUSE_MS + 1));
            match handler
                .handle(&pool, &job.effects, &runs, &key, me, pause)
                .await
            {
                Ok(true) => {
                    sqlx::query(AssertSqlSafe(ack.clone()))
                        .bind(seq)
                        .execute(&pool)
                        .await
                        .unwrap();
                    acked += 1;
                }
                Ok(false) => {}
                Err(e) => eprintln!("crash_window worker {me}: {key}: {e} (left for later)"),
            }
        }
        if acked == 0 {
            // Everything it picked is in flight elsewhere: like a broker's redelivery delay.
            tokio::time::sleep(IDLE).await;
        }
    }
}

fn worker_main(role: &str) {
    let consumer = Consumer::from_role(role).unwrap_or_else(|| panic!("unknown worker {role}"));
    let args = std::env::var(ARGS_ENV).expect("worker arguments");
    let (job, me, seed) = Job::from_args(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run_worker(consumer, job, me, seed));
}

// ---------------------------------------------------------------------------------------------
// The parent: queues, kills, counts
// ---------------------------------------------------------------------------------------------

fn spawn_worker(consumer: Consumer, job: &Job, me: usize, seed: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(WORKER_ENV, consumer.role())
        .env(ARGS_ENV, job.to_args(me, seed))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a worker process")
}

/// Worker processes that are killed (SIGKILL) when this is dropped, also on a panic.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Params {
    keys: u64,
    copies: u64,
    workers: usize,
    kills: u64,
    interval_ms: (u64, u64),
}

impl Params {
    fn from_env() -> Params {
        let interval_ms = match std::env::var("IDEM_CRASH_INTERVAL_MS") {
            Ok(v) => {
                let (lo, hi) = v
                    .split_once('-')
                    .and_then(|(lo, hi)| Some((lo.parse().ok()?, hi.parse().ok()?)))
                    .unwrap_or_else(|| panic!("IDEM_CRASH_INTERVAL_MS={v:?}: expected MIN-MAX"));
                assert!(lo <= hi, "IDEM_CRASH_INTERVAL_MS={v:?}: MIN above MAX");
                (lo, hi)
            }
            Err(_) => (30, 300),
        };
        Params {
            keys: env_num("IDEM_CRASH_KEYS", 1500).max(1),
            copies: env_num("IDEM_CRASH_COPIES", 3).max(1),
            workers: env_num("IDEM_CRASH_WORKERS", 3).max(1) as usize,
            kills: env_num("IDEM_CRASH_KILLS", 60),
            interval_ms,
        }
    }
}

/// What one consumer's run ended with.
#[derive(Debug)]
struct Outcome {
    consumer: Consumer,
    messages: u64,
    keys: u64,
    kills: u64,
    runs: u64,
    effect_rows: i64,
    doubles: u64,
    missing: u64,
    wall: Duration,
}

async fn exec(pool: &PgPool, sql: String) {
    sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
}

async fn unacked(pool: &PgPool, queue: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {queue} WHERE acked = 0"
    )))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Remove every Redis key starting with `prefix`.
async fn remove_redis_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// One consumer: fill its queue with `stream`, run and kill its workers on the schedule of
/// `kill_seed`, count the effects, clean up.
async fn run_consumer(
    consumer: Consumer,
    params: Params,
    stream: &[u64],
    kill_seed: u64,
    run: &str,
    pool: &PgPool,
    redis_conn: &mut redis::aio::MultiplexedConnection,
) -> Outcome {
    let name = |what: &str| format!("cw_{run}_{}_{what}", consumer.role());
    let job = Job {
        queue: name("queue"),
        effects: name("effects"),
        idem_table: if consumer.idem_table() {
            name("idem")
        } else {
            "-".to_owned()
        },
        redis_prefix: format!("crash_window:{run}:{}:", consumer.role()),
        total: stream.len() as u64,
    };
    exec(
        pool,
        format!(
            "CREATE TABLE {} (id BIGSERIAL PRIMARY KEY, msg_key TEXT NOT NULL, worker BIGINT NOT NULL)",
            job.effects
        ),
    )
    .await;
    exec(
        pool,
        format!(
            "CREATE TABLE {} (seq BIGINT PRIMARY KEY, msg_key TEXT NOT NULL, acked SMALLINT NOT NULL)",
            job.queue
        ),
    )
    .await;
    let values: Vec<String> = stream
        .iter()
        .enumerate()
        .map(|(seq, k)| format!("({seq}, 'msg-{k}', 0)"))
        .collect();
    exec(
        pool,
        format!(
            "INSERT INTO {} (seq, msg_key, acked) VALUES {}",
            job.queue,
            values.join(", ")
        ),
    )
    .await;
    if consumer.idem_table() {
        PgStore::with_table(pool.clone(), &job.idem_table)
            .unwrap()
            .migrate()
            .await
            .unwrap();
    }

    // The same schedule (victims, intervals, worker seeds) for every consumer.
    let mut rng = Rng::seeded(kill_seed);
    let started = Instant::now();
    let mut workers = Workers(
        (0..params.workers)
            .map(|w| spawn_worker(consumer, &job, w, rng.next()))
            .collect(),
    );
    let mut kills = 0;
    loop {
        let (lo, hi) = params.interval_ms;
        tokio::time::sleep(Duration::from_millis(rng.between(lo, hi))).await;
        let left = unacked(pool, &job.queue).await;
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{}: {left} messages still unacknowledged after {DEADLINE:?}",
            consumer.label()
        );
        if kills < params.kills {
            let victim = rng.below(params.workers as u64) as usize;
            let w = &mut workers.0[victim];
            // A worker that already exited (nothing left for it) is not a kill.
            if w.try_wait().unwrap().is_none() {
                w.kill().unwrap(); // SIGKILL
                w.wait().unwrap();
                kills += 1;
                *w = spawn_worker(consumer, &job, victim, rng.next());
            }
        }
        for (me, w) in workers.0.iter_mut().enumerate() {
            if let Some(status) = w.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{}: worker {me} failed: {status}",
                    consumer.label()
                );
                if unacked(pool, &job.queue).await > 0 {
                    *w = spawn_worker(consumer, &job, me, rng.next());
                }
            }
        }
    }
    let wall = started.elapsed();
    drop(workers);

    let per_key: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT msg_key, count(*) FROM {} GROUP BY msg_key",
        job.effects
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    let runs_file = job.runs_file();
    let runs = std::fs::read_to_string(&runs_file).map_or(0, |s| s.lines().count() as u64);
    let _ = std::fs::remove_file(&runs_file);
    let outcome = Outcome {
        consumer,
        messages: stream.len() as u64,
        keys: params.keys,
        kills,
        runs,
        effect_rows: per_key.iter().map(|(_, n)| n).sum(),
        doubles: per_key.iter().filter(|(_, n)| *n >= 2).count() as u64,
        missing: params.keys - per_key.len() as u64,
        wall,
    };

    for t in [&job.queue, &job.effects] {
        exec(pool, format!("DROP TABLE {t}")).await;
    }
    if consumer.idem_table() {
        exec(pool, format!("DROP TABLE {}", job.idem_table)).await;
        exec(pool, format!("DROP TABLE {}_migrations", job.idem_table)).await;
    }
    remove_redis_keys(redis_conn, &job.redis_prefix).await;
    outcome
}

async fn bench() {
    let params = Params::from_env();
    let seed = std::env::var("IDEM_SEED")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("IDEM_SEED={s:?} is not a number"))
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                ^ u64::from(std::process::id())
        });
    let only: Option<Vec<String>> = std::env::var("IDEM_CRASH_ONLY")
        .ok()
        .map(|o| o.split(',').map(|s| s.trim().to_owned()).collect());
    if let Some(only) = &only {
        for o in only {
            assert!(
                Consumer::from_role(o).is_some(),
                "IDEM_CRASH_ONLY: unknown consumer {o:?} (lock, redis, layered, tx)"
            );
        }
    }

    let pg = pg_url();
    let pool = match PgPoolOptions::new().max_connections(4).connect(&pg).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("crash_window: PostgreSQL at {pg} is not reachable ({e}); nothing measured");
            return;
        }
    };
    let url = redis_url();
    let mut redis_conn = match async {
        redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
    }
    .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crash_window: Redis at {url} is not reachable ({e}); nothing measured");
            return;
        }
    };

    let mut rng = Rng::seeded(seed);
    let mut stream: Vec<u64> = (0..params.keys * params.copies)
        .map(|i| i % params.keys)
        .collect();
    rng.shuffle(&mut stream);
    let kill_seed = rng.next();
    // Random, not from the seed: a replay never meets the tables of an earlier run.
    let run = Token::generate().to_hex()[..12].to_owned();

    println!(
        "crash_window: IDEM_SEED={seed}  keys={} copies={} workers={} kills<={} interval={}-{} ms, pause 0-{MAX_PAUSE_MS} ms, lease 1 s",
        params.keys,
        params.copies,
        params.workers,
        params.kills,
        params.interval_ms.0,
        params.interval_ms.1,
    );
    let mut outcomes = Vec::new();
    for consumer in Consumer::ALL {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|r| r == consumer.role()))
        {
            continue;
        }
        let o = run_consumer(
            consumer,
            params,
            &stream,
            kill_seed,
            &run,
            &pool,
            &mut redis_conn,
        )
        .await;
        eprintln!(
            "crash_window: {} done: {} kills, {} doubles, {:.1} s",
            consumer.label(),
            o.kills,
            o.doubles,
            o.wall.as_secs_f64()
        );
        outcomes.push(o);
    }

    println!();
    println!(
        "| consumer | messages | keys | kills | handler runs | effect rows | doubles | doubles per 100 kills | missing | wall |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            o.consumer.label(),
            o.messages,
            o.keys,
            o.kills,
            o.runs,
            o.effect_rows,
            o.doubles,
            if o.kills > 0 {
                format!("{:.1}", o.doubles as f64 * 100.0 / o.kills as f64)
            } else {
                "-".to_owned()
            },
            o.missing,
            o.wall.as_secs_f64(),
        );
    }
    println!("\nreplay: IDEM_SEED={seed} (the schedule; timings differ from run to run)");
    for o in &outcomes {
        assert_eq!(
            o.missing,
            0,
            "{}: {} keys have no effect although every message was acknowledged",
            o.consumer.label(),
            o.missing
        );
    }
}

fn main() {
    // A worker process: the parent re-executed this binary with the consumer in the environment.
    if let Ok(role) = std::env::var(WORKER_ENV) {
        worker_main(&role);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with no such flag: then only
    // check that it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}
