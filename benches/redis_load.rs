//! Load benchmark of the Redis store against two hand-written locks, side by side on the same
//! connection, in the same run.
//!
//! ```text
//! cargo bench -p idem-benches --all-features --bench redis_load
//! REDIS_URL=redis://127.0.0.1:6379 IDEM_BENCH_SECS=3 cargo bench -p idem-benches --all-features --bench redis_load
//! ```
//!
//! For each scenario (first call of a key; duplicate of a completed key; duplicate while the key is
//! in flight) and each concurrency (1, 16, 64 tasks), it runs idem's `run` on a [`RedisStore`]
//! and the two locks a user writes today: the **correct** one (`SET key token NX PX ttl`, run the
//! handler, a Lua compare-and-set of the result by `EVALSHA`, a Lua compare-and-`DEL` on error)
//! and the **naive** one (the same with a plain `SET key done PX keep` for the result, which can
//! overwrite a key another caller took over after the lock lapsed); a duplicate reads the key
//! with `GET`. Each runs for `IDEM_BENCH_SECS` seconds after a short warm-up, and the bench
//! prints calls/s, p50/p99 latency, round trips per call (counted by the client), Redis commands
//! per call (`INFO commandstats`, including the commands run inside Lua), Redis time executing
//! them and Redis process CPU per call. All share one multiplexed `ConnectionManager`; the keys a
//! run wrote are removed at the end. `IDEM_BENCH_RUNTIME=current` runs the tasks on a
//! current-thread runtime instead of the default multi-thread one;
//! `IDEM_BENCH_ONLY=first|done|inflight`, `IDEM_BENCH_CONCURRENCY=1|16|64` and
//! `IDEM_BENCH_IMPL=idem|cached|correct|baseline` narrow the run. Results and their reading:
//! `BENCHMARKS.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::redis::aio::{ConnectionLike, ConnectionManager};
use idem_runtime::redis::{self, Value};
use idem_runtime::{
    Begin, BeginRequest, CachedStore, Call, Error, Key, Lease, Options, RedisStore, Store,
    StoreError, Token, run,
};

mod plot;

const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Keys prepared for the duplicate scenarios, per implementation and cell.
const PREPARED: u64 = 4096;
const TTL: Duration = Duration::from_secs(60);
/// Long enough for the run; short, so a shared server does not keep the records for long.
const KEEP: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    First,
    DuplicateDone,
    DuplicateInFlight,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::First => "first call of a key",
            Scenario::DuplicateDone => "duplicate of a completed key",
            Scenario::DuplicateInFlight => "duplicate while in flight",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Idem,
    /// idem with the in-process cache of done records (`CachedStore`) in front of Redis.
    IdemCached,
    /// The naive hand-written lock: `SET NX PX`, then a plain `SET` of the result.
    Baseline,
    /// The correct hand-written lock: `SET NX PX`, then a token-checked Lua completion.
    Correct,
}

/// The correct baseline's completion: the result is written only while this call's token still
/// holds the key (a lapsed lock taken over by another caller is not overwritten).
const CAS_COMPLETE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end return 0";
/// The correct baseline's release: compare-and-delete.
const CAS_RELEASE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

impl Impl {
    /// As `IDEM_BENCH_IMPL` names it.
    fn id(self) -> &'static str {
        match self {
            Impl::Idem => "idem",
            Impl::IdemCached => "cached",
            Impl::Correct => "correct",
            Impl::Baseline => "baseline",
        }
    }

    /// As the table and the plot name it.
    fn label(self) -> &'static str {
        match self {
            Impl::Idem => "idem",
            Impl::IdemCached => "idem, CachedStore",
            Impl::Correct => "correct hand-written",
            Impl::Baseline => "naive hand-written",
        }
    }
}

fn sha(src: &str) -> String {
    redis::Script::new(src).get_hash().to_owned()
}

/// One implementation bound to a connection, with a client-side count of commands sent.
#[derive(Clone)]
struct Subject {
    which: Impl,
    store: Counting,
    /// The same store behind a `CachedStore` (used by `Impl::IdemCached`).
    cached: CachedStore<Counting>,
    conn: ConnectionManager,
    round_trips: Arc<AtomicU64>,
}

/// The Redis store, counting the operations (each one `EVALSHA`) the wrapper sends.
#[derive(Clone)]
struct Counting {
    inner: RedisStore,
    round_trips: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Store for Counting {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.begin(req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.complete(scope, key, lease, output, keep).await
    }
    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.release(scope, key, lease).await
    }
    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.extend(scope, key, lease, ttl).await
    }
    /// Renewals go through the store's own connection for the watchdog, uncounted (the benchmark's
    /// handlers finish long before a renewal is due).
    fn for_watchdog(&self) -> Arc<dyn Store> {
        self.inner.for_watchdog()
    }
}

/// What the handler returns (and what is stored and replayed).
fn output(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Subject {
    async fn send(&self, cmd: &redis::Cmd) -> Value {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.conn
            .clone()
            .req_packed_command(cmd)
            .await
            .expect("baseline command")
    }

    /// One call of key `n` in `scope`; true when the handler ran or its output was replayed,
    /// false when the duplicate was refused as in flight.
    async fn call(&self, opts: &Options, n: u64) -> bool {
        match self.which {
            Impl::Idem | Impl::IdemCached => {
                let store: &dyn Store = if self.which == Impl::IdemCached {
                    &self.cached
                } else {
                    &self.store
                };
                let r: Result<u64, Error> =
                    run(store, opts, Call::new(&n), || async move { Ok(output(n)) }).await;
                match r {
                    Ok(v) => {
                        debug_assert_eq!(v, output(n));
                        true
                    }
                    Err(Error::InFlight { .. }) => false,
                    Err(e) => panic!("idem call failed: {e}"),
                }
            }
            Impl::Baseline => self.hand_written(opts.scope_str(), n, false).await,
            Impl::Correct => self.hand_written(opts.scope_str(), n, true).await,
        }
    }

    /// A hand-written lock: SET NX PX, run, then mark done; a duplicate GETs the key. The naive
    /// one (`checked` false) marks with a plain SET, which overwrites a lock another worker
    /// took after this one's expired; the correct one marks by a Lua compare-and-set of its
    /// token (by `EVALSHA`, the script loaded once). Both release on error by a Lua
    /// compare-and-delete.
    async fn hand_written(&self, scope: &str, n: u64, checked: bool) -> bool {
        let prefix = if checked { "correct" } else { "baseline" };
        let key = format!("{prefix}:{scope}:{n}");
        let token = Token::generate().to_hex();
        let claimed = self
            .send(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(TTL.as_millis() as u64),
            )
            .await;
        if !matches!(claimed, Value::Okay) {
            return match self.send(redis::cmd("GET").arg(&key)).await {
                Value::BulkString(v) if v.starts_with(b"done:") => {
                    let v: u64 = std::str::from_utf8(&v[5..]).unwrap().parse().unwrap();
                    debug_assert_eq!(v, output(n));
                    true
                }
                _ => false,
            };
        }
        let out: Result<u64, ()> = Ok(output(n)); // the handler
        match out {
            Ok(v) if checked => {
                let done = self
                    .send(
                        redis::cmd("EVALSHA")
                            .arg(sha(CAS_COMPLETE))
                            .arg(1)
                            .arg(&key)
                            .arg(&token)
                            .arg(format!("done:{v}"))
                            .arg(KEEP.as_millis() as u64),
                    )
                    .await;
                assert!(
                    matches!(done, Value::Okay),
                    "correct baseline lost its lock"
                );
                true
            }
            Ok(v) => {
                self.send(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(format!("done:{v}"))
                        .arg("PX")
                        .arg(KEEP.as_millis() as u64),
                )
                .await;
                true
            }
            Err(()) => {
                self.send(
                    redis::cmd("EVALSHA")
                        .arg(sha(CAS_RELEASE))
                        .arg(1)
                        .arg(&key)
                        .arg(&token),
                )
                .await;
                false
            }
        }
    }

    /// Put keys `0..PREPARED` of `opts`' scope into the state the scenario needs.
    async fn prepare(&self, scenario: Scenario, opts: &Options) {
        let scope = opts.scope_str();
        for n in 0..PREPARED {
            match (scenario, self.which) {
                (Scenario::First, _) => return,
                (Scenario::DuplicateDone, _) => assert!(self.call(opts, n).await),
                (Scenario::DuplicateInFlight, Impl::Idem | Impl::IdemCached) => {
                    let key = Key::new(&n).unwrap();
                    let req = BeginRequest {
                        scope,
                        key: &key,
                        token: Token::generate(),
                        ttl: TTL,
                        fingerprint: None,
                    };
                    assert!(matches!(
                        self.store.begin(&req).await.unwrap(),
                        Begin::Acquired(_)
                    ));
                }
                (Scenario::DuplicateInFlight, Impl::Baseline | Impl::Correct) => {
                    let prefix = if self.which == Impl::Correct {
                        "correct"
                    } else {
                        "baseline"
                    };
                    self.send(
                        redis::cmd("SET")
                            .arg(format!("{prefix}:{scope}:{n}"))
                            .arg(Token::generate().to_hex())
                            .arg("NX")
                            .arg("PX")
                            .arg(TTL.as_millis() as u64),
                    )
                    .await;
                }
            }
        }
    }
}

struct Cell {
    calls: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    round_trips: f64,
    server_commands: f64,
    commands: String,
    /// Redis CPU (user + sys) per call: the whole process, network included.
    server_cpu: Duration,
    /// Redis time executing this side's commands per call (`INFO commandstats`).
    server_exec: Duration,
}

async fn server_cpu(conn: &mut ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let v = l
                .strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))?;
            v.trim().parse::<f64>().ok()
        })
        .sum()
}

/// `INFO commandstats`: calls and microseconds per command.
async fn commandstats(conn: &mut ConnectionManager) -> HashMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |f: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('='))?
                    .trim()
                    .parse()
                    .ok()
            };
            Some((name.to_owned(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

/// Run `concurrency` tasks calling `subject` for `secs`; each task takes the next key number.
async fn load(
    subject: &Subject,
    scenario: Scenario,
    opts: &Arc<Options>,
    concurrency: usize,
    length: Duration,
) -> (u64, Duration, Vec<u32>) {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (subject, opts, next) = (subject.clone(), opts.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let n = match scenario {
                    Scenario::First => PREPARED + i,
                    _ => i % PREPARED,
                };
                let t = Instant::now();
                let ok = subject.call(&opts, n).await;
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                assert_eq!(ok, scenario != Scenario::DuplicateInFlight, "{scenario:?}");
                if Instant::now() >= deadline {
                    return lat;
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    (all.len() as u64, elapsed, all)
}

async fn measure(
    subject: &Subject,
    scenario: Scenario,
    concurrency: usize,
    secs: Duration,
    stats: &mut ConnectionManager,
) -> Cell {
    let opts = fresh_scope();
    subject.prepare(scenario, &opts).await;
    // Warm-up (connection buffers, script cache, allocator), not counted.
    load(
        subject,
        scenario,
        &opts,
        concurrency,
        Duration::from_millis(300),
    )
    .await;
    // The first-call scenario must not reuse warm-up keys: a fresh scope.
    let opts = if scenario == Scenario::First {
        fresh_scope()
    } else {
        opts
    };
    let before = commandstats(stats).await;
    let cpu_before = server_cpu(stats).await;
    let rt_before = subject.round_trips.load(Ordering::Relaxed);
    let (calls, elapsed, mut lat) = load(subject, scenario, &opts, concurrency, secs).await;
    let rt = subject.round_trips.load(Ordering::Relaxed) - rt_before;
    let cpu = server_cpu(stats).await - cpu_before;
    let after = commandstats(stats).await;
    let delta = |k: &str| {
        let (c, u) = after.get(k).copied().unwrap_or_default();
        let (c0, u0) = before.get(k).copied().unwrap_or_default();
        (c - c0, u - u0)
    };
    let mut per: Vec<(String, u64)> = after
        .keys()
        .filter(|k| k.as_str() != "info")
        .map(|k| (k.clone(), delta(k).0))
        .filter(|(_, d)| *d > 0)
        .collect();
    per.sort_by_key(|p| std::cmp::Reverse(p.1));
    let server: u64 = per.iter().map(|(_, d)| d).sum();
    // Time Redis spent executing the commands clients sent: the scripts (which include what they
    // run inside) for idem, the plain commands for the baseline.
    let exec_usec: u64 = match subject.which {
        Impl::Idem | Impl::IdemCached => delta("evalsha").1 + delta("eval").1,
        Impl::Baseline | Impl::Correct => ["set", "get", "eval", "evalsha"]
            .iter()
            .map(|k| delta(k).1)
            .sum(),
    };
    lat.sort_unstable();
    let pick = |q: f64| {
        Duration::from_nanos(lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as u64)
    };
    Cell {
        calls,
        elapsed,
        p50: pick(0.50),
        p99: pick(0.99),
        round_trips: rt as f64 / calls as f64,
        server_commands: server as f64 / calls as f64,
        server_cpu: Duration::from_secs_f64(cpu / calls as f64),
        server_exec: Duration::from_secs_f64(exec_usec as f64 / 1e6 / calls as f64),
        commands: per
            .iter()
            .map(|(k, d)| format!("{k} {:.2}", *d as f64 / calls as f64))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn fmt_latency(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// This run's scopes all start with `bench:<run id>:`.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| Token::generate().to_hex()[16..].to_owned())
}

fn fresh_scope() -> Arc<Options> {
    Arc::new(Options::with_scope(format!(
        "bench:{}:{}",
        run_id(),
        Token::generate().to_hex()
    )))
}

/// Remove every key this run wrote.
async fn cleanup(conn: &mut ConnectionManager) {
    let run = run_id();
    {
        for pattern in [
            format!("idem:{{bench:{run}:*"),
            format!("baseline:bench:{run}:*"),
            format!("correct:bench:{run}:*"),
        ] {
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
    }
}

async fn bench() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let secs = Duration::from_secs_f64(
        std::env::var("IDEM_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    );
    let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let conn = match client
        .get_connection_manager_with_config(RedisStore::manager_config())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis_load: Redis at {url} is not reachable ({e}); nothing measured");
            std::process::exit(if std::env::var("CI").is_ok_and(|v| v == "true") {
                1
            } else {
                0
            });
        }
    };
    let mut stats = client
        .get_connection_manager()
        .await
        .expect("stats connection");
    let store = RedisStore::new(conn.clone());
    let subject = |which| {
        let round_trips = Arc::new(AtomicU64::new(0));
        let counting = Counting {
            inner: store.clone(),
            round_trips: round_trips.clone(),
        };
        Subject {
            which,
            cached: CachedStore::new(counting.clone()),
            store: counting,
            conn: conn.clone(),
            round_trips,
        }
    };
    let (idem, cached, baseline, correct) = (
        subject(Impl::Idem),
        subject(Impl::IdemCached),
        subject(Impl::Baseline),
        subject(Impl::Correct),
    );
    // The correct baseline's scripts, loaded once as a user's `redis::Script` would.
    for src in [CAS_COMPLETE, CAS_RELEASE] {
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(src)
            .query_async(&mut stats)
            .await
            .expect("SCRIPT LOAD");
    }

    println!(
        "| scenario | concurrency | implementation | calls/s | p50 | p99 | round trips/call | Redis commands/call | Redis exec/call | Redis CPU/call | commands/call (INFO commandstats) |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    // IDEM_BENCH_ONLY=first|done|inflight and IDEM_BENCH_CONCURRENCY=64 narrow the run.
    let only = std::env::var("IDEM_BENCH_ONLY").ok();
    let only_c: Option<usize> = std::env::var("IDEM_BENCH_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok());
    for scenario in [
        Scenario::First,
        Scenario::DuplicateDone,
        Scenario::DuplicateInFlight,
    ] {
        let name = match scenario {
            Scenario::First => "first",
            Scenario::DuplicateDone => "done",
            Scenario::DuplicateInFlight => "inflight",
        };
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut series: Vec<plot::Series> = Vec::new();
        for c in CONCURRENCY {
            if only_c.is_some_and(|o| o != c) {
                continue;
            }
            for s in [&idem, &cached, &correct, &baseline] {
                // IDEM_BENCH_IMPL=idem|cached|correct|baseline runs one side only (for profiling).
                if std::env::var("IDEM_BENCH_IMPL").is_ok_and(|i| i != s.which.id()) {
                    continue;
                }
                let cell = measure(s, scenario, c, secs, &mut stats).await;
                let line = s.which.label();
                let rate = cell.calls as f64 / cell.elapsed.as_secs_f64();
                match series.iter_mut().find(|l| l.name == line) {
                    Some(l) => l.points.push((c as f64, rate)),
                    None => series.push(plot::Series {
                        name: line.to_owned(),
                        points: vec![(c as f64, rate)],
                    }),
                }
                println!(
                    "| {} | {c} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.1} µs | {:.1} µs | {} |",
                    scenario.label(),
                    match s.which {
                        Impl::Idem | Impl::IdemCached => format!("**{}**", s.which.label()),
                        other => other.label().to_owned(),
                    },
                    cell.calls as f64 / cell.elapsed.as_secs_f64(),
                    fmt_latency(cell.p50),
                    fmt_latency(cell.p99),
                    cell.round_trips,
                    cell.server_commands,
                    cell.server_exec.as_secs_f64() * 1e6,
                    cell.server_cpu.as_secs_f64() * 1e6,
                    cell.commands,
                );
            }
        }
        plot::write(
            &format!("redis_load-{name}.svg"),
            &format!("Redis: {}, calls/s by tasks", scenario.label()),
            &series,
        );
    }
    cleanup(&mut stats).await;
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with no such flag: then only
    // check that it builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = match std::env::var("IDEM_BENCH_RUNTIME").as_deref() {
        Ok("current") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .unwrap();
    rt.block_on(bench());
}
