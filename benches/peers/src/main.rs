//! Duplicates on Redis, side by side with a peer: idem's `run` on a [`RedisStore`] (alone, and
//! behind a [`CachedStore`]) and the `idempotent` crate 2.0's `ValkeyStore` claim-or-replay path
//! (`claim(..).fingerprint(..).execute_or_replay(..)`, as its README shows it), each on a key
//! already completed, so that every call finds the stored result and replays it.
//!
//! ```text
//! cd benches/peers && cargo run --release --ignore-rust-version
//! REDIS_URL=redis://127.0.0.1:6379 IDEM_BENCH_SECS=3 IDEM_BENCH_ROUNDS=3 cargo run --release --ignore-rust-version
//! ```
//!
//! Each cell (implementation × 1, 16, 64 concurrent tasks) completes `PREPARED` fresh keys, warms
//! up for 300 ms, then runs for `IDEM_BENCH_SECS` seconds (default 3); the implementations are
//! interleaved cell by cell, in an order that rotates every round, for `IDEM_BENCH_ROUNDS` rounds
//! (default 3), and the table shows each figure's median over the rounds. idem runs on one
//! multiplexed `ConnectionManager` (`RedisStore::manager_config()`), the peer on its own, built by
//! `ValkeyStore::with_url(..).try_build()`. Redis commands per call are counted by
//! `INFO commandstats` (the commands Lua runs included) on a third connection. The keys written
//! are removed at the end. This crate is not a member of the root workspace: `idempotent` 2.0
//! declares `rust-version = 1.98` (hence `--ignore-rust-version`). Results: `BENCHMARKS.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_runtime::redis::aio::ConnectionManager;
use idem_runtime::redis::{self};
use idem_runtime::{CachedStore, Call, Error, Options, RedisStore, Token, run};
use idempotent::valkey::ValkeyStore;
use idempotent::{CachedResponse, ExecutionOutcome, IdempotencyKey, IdempotencyStore, Metadata};

const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Keys completed before each cell; the cell's calls cycle through them.
const PREPARED: u64 = 4096;
/// The lease of a claim (idem's `Options::ttl`, the peer's processing TTL).
const TTL: Duration = Duration::from_secs(60);
/// How long a completed key is kept (idem's `Options::keep`, the peer's completed TTL): long
/// enough for a cell, short, so a shared server does not keep the records for long.
const KEEP: Duration = Duration::from_secs(120);
/// The peer's fingerprint operation (it requires a fingerprint; idem's `Call::new` has none).
const OPERATION: &str = "POST /bench";

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Impl {
    Idem,
    IdemCached,
    Peer,
}

impl Impl {
    const ALL: [Impl; 3] = [Impl::Idem, Impl::IdemCached, Impl::Peer];

    fn label(self) -> &'static str {
        match self {
            Impl::Idem => "idem",
            Impl::IdemCached => "idem + CachedStore",
            Impl::Peer => "idempotent 2.0 ValkeyStore",
        }
    }
}

/// What each handler returns, and what is stored and replayed: eight bytes (idem stores it as
/// MessagePack, the peer as the body of a `CachedResponse`).
fn output(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn response(v: u64) -> CachedResponse {
    CachedResponse::new(200, Metadata::new(), v.to_le_bytes().to_vec().into())
}

#[derive(Clone)]
struct Subjects {
    idem: RedisStore,
    cached: CachedStore<RedisStore>,
    peer: ValkeyStore,
}

/// One cell's keys: an idem scope, or a key prefix under the peer's store prefix.
#[derive(Clone)]
struct Cell {
    which: Impl,
    opts: Arc<Options>,
    /// The peer's keys are `<this>-<n>` (its keys may not contain `:` or `/`).
    peer_key: Arc<str>,
}

impl Subjects {
    /// One call of key `n`; true when the handler ran, false when the stored result was replayed.
    async fn call(&self, cell: &Cell, n: u64) -> bool {
        match cell.which {
            Impl::Idem | Impl::IdemCached => {
                let ran = AtomicU64::new(0);
                let ran = &ran;
                let r: Result<u64, Error> = if cell.which == Impl::Idem {
                    run(&self.idem, &cell.opts, Call::new(&n), || async move {
                        ran.store(1, Ordering::Relaxed);
                        Ok(output(n))
                    })
                    .await
                } else {
                    run(&self.cached, &cell.opts, Call::new(&n), || async move {
                        ran.store(1, Ordering::Relaxed);
                        Ok(output(n))
                    })
                    .await
                };
                let v = r.unwrap_or_else(|e| panic!("idem call failed: {e}"));
                assert_eq!(v, output(n));
                ran.load(Ordering::Relaxed) == 1
            }
            Impl::Peer => {
                let key = IdempotencyKey::new(format!("{}-{n}", cell.peer_key)).unwrap();
                let outcome = self
                    .peer
                    .claim(&key, TTL)
                    .fingerprint(OPERATION, b"")
                    .execute_or_replay(KEEP, |_token| async move { Ok(response(output(n))) })
                    .await
                    .unwrap_or_else(|e| panic!("idempotent call failed: {e:?}"));
                let (ran, r) = match outcome {
                    ExecutionOutcome::Executed(r) => (true, r),
                    ExecutionOutcome::Replayed(r) => (false, r),
                    other => panic!("idempotent: unexpected outcome {other:?}"),
                };
                let v = u64::from_le_bytes(r.body.as_ref().try_into().unwrap());
                assert_eq!(v, output(n));
                ran
            }
        }
    }
}

struct Measured {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// Redis commands per call (`INFO commandstats`), and the busiest ones.
    commands: f64,
    per_command: String,
}

/// Run `concurrency` tasks calling `cell` for `length`; each task takes the next key number.
async fn load(
    subjects: &Subjects,
    cell: &Cell,
    concurrency: usize,
    length: Duration,
    expect_ran: bool,
    keys: u64,
) -> (u64, Duration, Vec<u32>) {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (subjects, cell, next) = (subjects.clone(), cell.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return lat;
                }
                let n = i % PREPARED;
                let t = Instant::now();
                let ran = subjects.call(&cell, n).await;
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                assert_eq!(ran, expect_ran, "{:?} key {n}", cell.which);
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
    (all.len() as u64, start.elapsed(), all)
}

/// `INFO commandstats`: calls per command.
async fn commandstats(conn: &mut ConnectionManager) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

async fn measure(
    subjects: &Subjects,
    cell: &Cell,
    concurrency: usize,
    secs: Duration,
    stats: &mut ConnectionManager,
) -> Measured {
    // Complete the cell's keys (32 at a time), then warm up on them, uncounted.
    let (done, _, _) = load(
        subjects,
        cell,
        32,
        Duration::from_secs(3600),
        true,
        PREPARED,
    )
    .await;
    assert_eq!(done, PREPARED);
    load(
        subjects,
        cell,
        concurrency,
        Duration::from_millis(300),
        false,
        u64::MAX,
    )
    .await;
    let before = commandstats(stats).await;
    let (calls, elapsed, mut lat) = load(subjects, cell, concurrency, secs, false, u64::MAX).await;
    let after = commandstats(stats).await;
    let mut per: Vec<(String, u64)> = after
        .iter()
        .filter(|(k, _)| k.as_str() != "info")
        .map(|(k, c)| (k.clone(), c - before.get(k).copied().unwrap_or_default()))
        .filter(|(_, d)| *d > 0)
        .collect();
    per.sort_by_key(|p| std::cmp::Reverse(p.1));
    lat.sort_unstable();
    let pick = |q: f64| {
        Duration::from_nanos(lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as u64)
    };
    Measured {
        rate: calls as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
        commands: per.iter().map(|(_, d)| *d).sum::<u64>() as f64 / calls as f64,
        per_command: per
            .iter()
            .map(|(k, d)| format!("{k} {:.2}", *d as f64 / calls as f64))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Remove every key matching `pattern`.
async fn unlink(conn: &mut ConnectionManager, pattern: &str) -> u64 {
    let (mut cursor, mut removed) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(conn)
                .await
                .unwrap();
            removed += n;
        }
        if next == 0 {
            return removed;
        }
        cursor = next;
    }
}

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let secs = Duration::from_secs_f64(env_num("IDEM_BENCH_SECS", 3.0));
    let rounds = (env_num("IDEM_BENCH_ROUNDS", 3.0) as usize).max(1);
    let run_id = Token::generate().to_hex()[16..].to_owned();

    let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
    let conn = match client
        .get_connection_manager_with_config(RedisStore::manager_config())
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("idem-peers: Redis at {url} is not reachable ({e}); nothing measured");
            std::process::exit(1);
        }
    };
    let mut stats = client
        .get_connection_manager()
        .await
        .expect("stats connection");
    let idem = RedisStore::new(conn);
    // The peer as its README builds it: from the URL, with a prefix of its own.
    let peer_prefix = format!("peers-{run_id}-idempotent");
    let peer = ValkeyStore::with_url(url.as_str())
        .prefix(peer_prefix.as_str())
        .try_build()
        .await
        .expect("ValkeyStore");
    let subjects = Subjects {
        cached: CachedStore::new(idem.clone()),
        idem,
        peer,
    };

    eprintln!(
        "idem-peers: duplicates of a completed key, {rounds} round(s) of {:.1} s per cell, Redis at {url}",
        secs.as_secs_f64()
    );
    let mut results: HashMap<(Impl, usize), Vec<Measured>> = HashMap::new();
    let mut cell_no = 0u64;
    // A pass of each side, uncounted, before the first round: the first cell of a run came out
    // cold (half the rate of the same cell in later rounds), whichever side it was.
    for which in Impl::ALL {
        cell_no += 1;
        let cell = Cell {
            which,
            opts: Arc::new(
                Options::with_scope(format!("peers:{run_id}:{which:?}:{cell_no}"))
                    .ttl(TTL)
                    .keep(KEEP),
            ),
            peer_key: format!("c{cell_no}").into(),
        };
        measure(&subjects, &cell, 16, Duration::from_secs(1), &mut stats).await;
    }
    for round in 0..rounds {
        for c in CONCURRENCY {
            for i in 0..Impl::ALL.len() {
                // The order rotates every round, so that no side always runs first.
                let which = Impl::ALL[(i + round) % Impl::ALL.len()];
                cell_no += 1;
                let cell = Cell {
                    which,
                    opts: Arc::new(
                        Options::with_scope(format!("peers:{run_id}:{which:?}:{cell_no}"))
                            .ttl(TTL)
                            .keep(KEEP),
                    ),
                    peer_key: format!("c{cell_no}").into(),
                };
                let hits = subjects.cached.hits();
                let m = measure(&subjects, &cell, c, secs, &mut stats).await;
                if which == Impl::IdemCached {
                    // Every duplicate (warm-up included) must have been a hit of the cache.
                    assert!(subjects.cached.hits() > hits, "CachedStore was not hit");
                }
                eprintln!(
                    "  round {} | {c:>2} tasks | {:<26} | {:>8.0} calls/s | p50 {:>6.1} µs | p99 {:>7.1} µs | Redis commands/call {:.2} ({})",
                    round + 1,
                    which.label(),
                    m.rate,
                    m.p50.as_secs_f64() * 1e6,
                    m.p99.as_secs_f64() * 1e6,
                    m.commands,
                    m.per_command,
                );
                results.entry((which, c)).or_default().push(m);
            }
        }
    }

    let med = |which: Impl, c: usize, f: &dyn Fn(&Measured) -> f64| {
        median(results[&(which, c)].iter().map(f).collect())
    };
    println!(
        "| implementation | tasks | calls/s | p50 µs | p99 µs | Redis commands/call | calls/s ÷ peer (paired by round, median) | p50 ÷ peer (same) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in CONCURRENCY {
        // Ratios are paired by round (the two cells ran seconds apart), then the median taken:
        // steadier on a loaded machine than a ratio of medians.
        let paired = |which: Impl, f: &dyn Fn(&Measured) -> f64| {
            median(
                results[&(which, c)]
                    .iter()
                    .zip(&results[&(Impl::Peer, c)])
                    .map(|(a, p)| f(a) / f(p))
                    .collect(),
            )
        };
        for which in Impl::ALL {
            let rate = med(which, c, &|m| m.rate);
            let p50 = med(which, c, &|m| m.p50.as_secs_f64());
            let p99 = med(which, c, &|m| m.p99.as_secs_f64());
            let commands = med(which, c, &|m| m.commands);
            let (ratio, p50_ratio) = if which == Impl::Peer {
                ("1".to_owned(), "1".to_owned())
            } else {
                (
                    format!("{:.2}×", paired(which, &|m| m.rate)),
                    format!("{:.3}", paired(which, &|m| m.p50.as_secs_f64())),
                )
            };
            println!(
                "| {} | {c} | {rate:.0} | {:.1} | {:.1} | {commands:.2} | {ratio} | {p50_ratio} |",
                which.label(),
                p50 * 1e6,
                p99 * 1e6,
            );
        }
    }

    let removed = unlink(&mut stats, &format!("idem:{{peers:{run_id}:*")).await
        + unlink(&mut stats, &format!("{peer_prefix}:*")).await;
    eprintln!("idem-peers: removed {removed} keys");
}
