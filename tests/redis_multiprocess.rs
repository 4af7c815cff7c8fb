//! Several OS processes race on the same keys through the Redis store: each key's effect, counted
//! outside the processes (an `INCR` on a counter key of its own in Redis), happens exactly once,
//! and every process gets the same output for a key.
//!
//! The test re-executes its own binary as the child processes (`race_child`, which does nothing
//! in a normal test run), and starts them all at once with a line on their stdin.
mod redis_support;
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use idem_runtime::redis::{self, AsyncCommands};
use idem_runtime::{Call, Error, Options, RedisStore, Token, run};
use redis_support::{redis_url, shared_conn, signal};

const CHILDREN: usize = 4;
const KEYS: u32 = 40;
const SCOPE_VAR: &str = "IDEM_RACE_SCOPE";

fn counter_key(scope: &str, k: u32) -> String {
    format!("idem-race-effects:{scope}:{k}")
}

#[test]
fn processes_racing_on_the_same_keys_run_each_effect_once() {
    if std::env::var_os(SCOPE_VAR).is_some() {
        return; // this is a child: only `race_child` runs
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(mut conn) = rt.block_on(shared_conn()) else {
        return;
    };
    let scope = format!("idem-race:{}", Token::generate().to_hex());

    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for _ in 0..CHILDREN {
        let mut child = Command::new(&exe)
            .args(["race_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(SCOPE_VAR, &scope)
            .env("REDIS_URL", redis_url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a child process");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        children.push((child, stdout.lines()));
    }
    // Each child says "ready" once connected; then all get "go" together.
    for (_, lines) in &mut children {
        loop {
            let line = lines.next().expect("child exited before ready").unwrap();
            // libtest may print "test race_child ... " on the same line first.
            if line.ends_with("race: ready") {
                break;
            }
        }
    }
    for (child, _) in &mut children {
        signal(child.stdin.as_mut().unwrap());
    }
    // Collect "race: out <key> <output>" from every child.
    let mut outputs: HashMap<u32, Vec<String>> = HashMap::new();
    for (mut child, lines) in children {
        for line in lines {
            let line = line.unwrap();
            if let Some((_, rest)) = line.split_once("race: out ") {
                let (k, v) = rest.split_once(' ').unwrap();
                outputs
                    .entry(k.parse().unwrap())
                    .or_default()
                    .push(v.to_owned());
            }
        }
        assert!(child.wait().unwrap().success(), "a child process failed");
    }
    assert_eq!(outputs.len(), KEYS as usize);
    for (k, outs) in &outputs {
        assert_eq!(outs.len(), CHILDREN, "key {k}: {outs:?}");
        assert!(
            outs.windows(2).all(|w| w[0] == w[1]),
            "key {k} answered differently: {outs:?}"
        );
    }
    rt.block_on(async {
        for k in 0..KEYS {
            let effects: u32 = conn.get(counter_key(&scope, k)).await.unwrap();
            assert_eq!(effects, 1, "key {k}: the effect ran {effects} times");
        }
        let counters: Vec<String> = (0..KEYS).map(|k| counter_key(&scope, k)).collect();
        let _: () = conn.del(counters).await.unwrap();
    });
}

/// The child process: every key at once, each call a delivery that waits for an in-flight holder
/// and replays its output; the handler's effect is an `INCR` outside this process.
#[test]
fn race_child() {
    let Ok(scope) = std::env::var(SCOPE_VAR) else {
        return; // a normal test run
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = RedisStore::from_url(&redis_url()).await.unwrap();
        let effects = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        println!("race: ready");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).unwrap();

        let opts = Options::with_scope(scope.clone()).wait(Duration::from_secs(30));
        let pid = std::process::id();
        let mut tasks = Vec::new();
        for k in 0..KEYS {
            let (store, opts, scope, mut effects) =
                (store.clone(), opts.clone(), scope.clone(), effects.clone());
            tasks.push(tokio::spawn(async move {
                let out: Result<String, Error> = run(&store, &opts, Call::new(&k), || async move {
                    let counter = counter_key(&scope, k);
                    let (_, ()): (u32, ()) = redis::pipe()
                        .incr(&counter, 1)
                        .expire(&counter, 3600)
                        .query_async(&mut effects)
                        .await
                        .unwrap();
                    // Long enough that the other processes arrive while it is in flight.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok(format!("pid{pid}-key{k}"))
                })
                .await;
                (k, out.expect("call failed"))
            }));
        }
        for t in tasks {
            let (k, out) = t.await.unwrap();
            println!("race: out {k} {out}");
        }
    });
}
