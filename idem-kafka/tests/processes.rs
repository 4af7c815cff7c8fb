//! Scenario 2: a consumer process SIGKILLed (`kill -9`) after its effect committed and before
//! its offset commit, replaced by a new process of the same group: the record is delivered
//! again, replayed, one effect; then committed.
//!
//! The consumer processes are this test binary run again (`child_consumer`, which does nothing
//! unless `IDEM_KAFKA_CHILD` is set).
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_kafka::{End, Glue};
use idem_runtime::ack::Policy;
use rdkafka::Message;

use support::*;

/// The consumer process. Env: IDEM_KAFKA_CHILD (group), IDEM_KAFKA_TOPIC, IDEM_KAFKA_RUN,
/// IDEM_KAFKA_EFFECTS, IDEM_KAFKA_TABLE, IDEM_KAFKA_HANG (hang after the effect's commit),
/// IDEM_KAFKA_UNTIL_OFFSET.
/// Prints `HANDLED <order>` after each handler's commit (a run or a replay) and `SETTLED <offset> <end>` per record;
/// exits after one settled record.
#[test]
fn child_consumer() {
    let Ok(group) = std::env::var("IDEM_KAFKA_CHILD") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap();
    let hang = std::env::var("IDEM_KAFKA_HANG").is_ok();
    let until_offset: Option<i64> = std::env::var("IDEM_KAFKA_UNTIL_OFFSET")
        .ok()
        .map(|v| v.parse().unwrap());
    // The glue's log lines (WARN and above; IDEM_KAFKA_DEBUG for DEBUG) on the child's stderr.
    let level = if std::env::var("IDEM_KAFKA_DEBUG").is_ok() {
        tracing_subscriber::filter::LevelFilter::DEBUG
    } else {
        tracing_subscriber::filter::LevelFilter::WARN
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .try_init();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let pool = pg().await.expect("PostgreSQL");
        let store = pg_store(&pool, &var("IDEM_KAFKA_TABLE")).await;
        let ctx = Ctx {
            pool,
            store,
            run: Arc::from(var("IDEM_KAFKA_RUN").as_str()),
            effects: Arc::from(var("IDEM_KAFKA_EFFECTS").as_str()),
            worker: Arc::from(std::process::id().to_string().as_str()),
        };
        let log = Log::default();
        let l = log.clone();
        let glue: Glue = Glue::builder(config(&group))
            .policy(Policy::default().in_flight(Duration::from_millis(100), Duration::from_secs(1)))
            .on_settled(move |s| {
                println!("SETTLED {} {:?}", s.offset, s.end);
                l.0.lock().unwrap().push(s.clone());
            })
            .build()
            .unwrap();
        glue.subscribe(&[&var("IDEM_KAFKA_TOPIC")]).unwrap();
        let l = log.clone();
        glue.run_until(
            move |record| {
                let ctx = ctx.clone();
                async move {
                    let coupon = ctx.handle_tx(record.payload().unwrap_or_default()).await?;
                    println!("HANDLED {coupon}");
                    if hang {
                        // Killed here: the effect and its mark are committed, the offset not.
                        tokio::time::sleep(Duration::from_secs(600)).await;
                    }
                    Ok::<_, AppError>(coupon)
                }
            },
            // Exits after one settled record, or with IDEM_KAFKA_UNTIL_OFFSET=n once the record
            // at offset n - 1 is settled.
            wait_until(
                120,
                "the child did not settle what it should",
                move || match until_offset {
                    None => l.len() >= 1,
                    Some(n) => l.all().iter().any(|s| s.offset + 1 >= n),
                },
            ),
        )
        .await
        .unwrap();
    });
}

fn spawn_child(
    group: &str,
    topic: &str,
    run: &str,
    effects: &str,
    table: &str,
    hang: bool,
) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_consumer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("IDEM_KAFKA_CHILD", group)
    .env("IDEM_KAFKA_TOPIC", topic)
    .env("IDEM_KAFKA_RUN", run)
    .env("IDEM_KAFKA_EFFECTS", effects)
    .env("IDEM_KAFKA_TABLE", table)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if hang {
        cmd.env("IDEM_KAFKA_HANG", "1");
    }
    cmd.spawn().unwrap()
}

/// Read the child's stdout lines until one starts with `prefix` (in a thread; `secs` at most).
fn wait_line(child: &mut Child, prefix: &str, secs: u64) -> (String, Vec<String>) {
    let stdout = child.stdout.take().unwrap();
    let prefix = prefix.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints `test child_consumer ... ` without a newline before the test's
            // own output: the line is what follows the prefix's first occurrence.
            let line = match line.find(&prefix) {
                Some(at) => line[at..].to_owned(),
                None => line,
            };
            let hit = line.starts_with(&prefix);
            lines.push(line.clone());
            if hit {
                let _ = tx.send((line, lines.clone()));
            }
        }
        let _ = tx.send((String::new(), lines));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("no line from the child in {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_after_the_effect_before_the_commit_is_replaced_with_one_effect() {
    let Some(pool) = servers().await else { return };
    let (topic, group, table, effects, run) = (
        unique("idem_kafka_kill"),
        unique("g"),
        unique("idem_kafka"),
        unique("eff"),
        unique("run"),
    );
    create_topic(&topic, 1).await;
    create_effects(&pool, &effects).await;
    drop(pg_store(&pool, &table).await);
    let p = producer();
    produce(&p, &topic, 0, "7", &order(7, 0)).await;
    let started = Instant::now();

    // The first consumer: its effect commits, then it hangs before the offset commit ...
    let mut first = spawn_child(&group, &topic, &run, &effects, &table, true);
    let (line, _) = wait_line(&mut first, "HANDLED", 60);
    assert_eq!(line, "HANDLED 7");
    assert_eq!(effect_count(&pool, &effects).await, 1);
    // ... and is killed there, for real.
    let status = Command::new("kill")
        .args(["-9", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = first.wait();
    assert_eq!(
        committed(&group, &topic, 1).await,
        [None],
        "nothing committed yet"
    );

    // The replacement gets the record again, replays it, and commits.
    let mut second = spawn_child(&group, &topic, &run, &effects, &table, false);
    let (line, lines) = wait_line(&mut second, "SETTLED", 90);
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the replacement did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{lines:?}");
    let replayed = format!(
        "SETTLED 0 {:?}",
        End::Committed {
            outcome: Some(idem_runtime::CallOutcome::Replayed)
        }
    );
    assert_eq!(line, replayed, "{lines:?}");
    assert_eq!(effect_count(&pool, &effects).await, 1);
    assert_eq!(committed(&group, &topic, 1).await, [Some(1)]);
    eprintln!("kill and replacement: {:?}", started.elapsed());
    // records: delivered to both processes; deliveries: handler runs (1 + 1); commits: 1.
    row(
        "2 SIGKILL after effect, before commit; replaced",
        2,
        2,
        1,
        1,
        0,
    );
    let _ = p;
    drop_table(&pool, &effects).await;
    drop_store(&pool, &table).await;
}

/// The child's stdout, line by line (the part from `HANDLED` or `SETTLED` on), through a thread.
fn line_feed(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            for tag in ["HANDLED", "SETTLED"] {
                if let Some(at) = line.find(tag) {
                    let _ = tx.send(line[at..].to_owned());
                }
            }
        }
    });
    rx
}

/// (Figures: deliveries are handler runs that returned, commits the records settled as committed,
/// as the children printed them before they were killed.)
/// Consumers `kill -9`ed at varied points (mid-handler, between the effect and the commit, after
/// a commit), each replaced by a new process of the group, then one that runs to the end: one
/// effect per order, every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_killed_at_varied_points_leave_one_effect_per_order() {
    let Some(pool) = servers().await else { return };
    let (topic, group, table, effects, run) = (
        unique("idem_kafka_kills"),
        unique("g"),
        unique("idem_kafka"),
        unique("eff"),
        unique("run"),
    );
    const ORDERS: i64 = 12;
    const KILLS: u64 = 4;
    create_topic(&topic, 1).await;
    create_effects(&pool, &effects).await;
    drop(pg_store(&pool, &table).await);
    let p = producer();
    for o in 0..ORDERS {
        produce(&p, &topic, 0, &o.to_string(), &order(o, 120)).await;
    }
    let started = Instant::now();
    let (mut handled, mut settled) = (0, 0u64);
    for k in 0..KILLS {
        let mut child = spawn_child(&group, &topic, &run, &effects, &table, false);
        let feed = line_feed(&mut child);
        // Let it handle one or two records, then kill it 0-110 ms later.
        let want = 1 + (k % 2);
        let mut got = 0;
        while got < want {
            match feed.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.starts_with("HANDLED") => got += 1,
                Ok(l) => settled += u64::from(l.contains("Committed")),
                Err(e) => panic!("child {k}: {e}"),
            }
        }
        handled += got;
        std::thread::sleep(Duration::from_millis(k * 37 % 111));
        let status = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = child.wait();
        // What it printed before the kill (the feed ends with its stdout).
        while let Ok(l) = feed.recv_timeout(Duration::from_secs(5)) {
            if l.starts_with("HANDLED") {
                handled += 1;
            } else {
                settled += u64::from(l.contains("Committed"));
            }
        }
    }
    // The last one runs to the end (the record at offset ORDERS - 1).
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_consumer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("IDEM_KAFKA_CHILD", &group)
    .env("IDEM_KAFKA_TOPIC", &topic)
    .env("IDEM_KAFKA_RUN", &run)
    .env("IDEM_KAFKA_EFFECTS", &effects)
    .env("IDEM_KAFKA_TABLE", &table)
    .env("IDEM_KAFKA_UNTIL_OFFSET", ORDERS.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut last = cmd.spawn().unwrap();
    let feed = line_feed(&mut last);
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        while let Ok(l) = feed.try_recv() {
            if l.starts_with("HANDLED") {
                handled += 1;
            } else {
                settled += u64::from(l.contains("Committed"));
            }
        }
        if let Some(s) = last.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the last consumer did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success());
    // What it printed before it exited (the feed ends with its stdout).
    while let Ok(l) = feed.recv_timeout(Duration::from_secs(5)) {
        if l.starts_with("HANDLED") {
            handled += 1;
        } else {
            settled += u64::from(l.contains("Committed"));
        }
    }
    let per_order = effects_per_order(&pool, &effects).await;
    assert_eq!(per_order.len() as i64, ORDERS, "{per_order:?}");
    assert!(per_order.iter().all(|(_, n)| *n == 1), "{per_order:?}");
    assert_eq!(committed(&group, &topic, 1).await, [Some(ORDERS)]);
    eprintln!("{KILLS} kills: {:?}", started.elapsed());
    row(
        &format!("2b {KILLS} consumers kill -9ed at varied points, then one to the end"),
        ORDERS as u64,
        handled,
        ORDERS,
        settled,
        0,
    );
    drop_table(&pool, &effects).await;
    drop_store(&pool, &table).await;
}
