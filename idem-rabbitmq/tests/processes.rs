//! The scenarios with several consumer processes on one queue (this test binary started again as
//! workers): duplicates racing a running holder, and consumers killed with SIGKILL at random
//! moments. The handler is the transactional attribute on PostgreSQL; effects are counted in a
//! table without a unique key.
mod common;
mod support;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use idem_rabbitmq::{Glue, QueueKind};
use idem_runtime::PgStore;
use idem_runtime::ack::Policy;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use common::*;
use support::*;

/// Start this test binary as a consumer process. It stops when its stdin closes.
fn spawn_worker(role: &str, args: &[String]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDEM_RMQ_WORKER", role)
        .env("IDEM_RMQ_WORKER_ARGS", args.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a worker process")
}

/// Worker processes, killed (SIGKILL) when dropped, also when a test panics.
struct Workers(Vec<Child>);

impl Workers {
    /// Close every worker's stdin and wait for it to stop (it closes its channel first, so
    /// what it held goes back to the queue).
    fn stop(&mut self) {
        for w in &mut self.0 {
            drop(w.stdin.take());
        }
        for (i, w) in self.0.iter_mut().enumerate() {
            let status = w.wait().unwrap();
            assert!(status.success(), "worker {i} failed: {status}");
        }
        self.0.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The entry point of the worker processes. In a normal test run it does nothing.
#[test]
fn worker_process() {
    let Ok(role) = std::env::var("IDEM_RMQ_WORKER") else {
        return;
    };
    let args: Vec<String> = std::env::var("IDEM_RMQ_WORKER_ARGS")
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    match role.as_str() {
        "tx" => rt.block_on(tx_worker(&args)),
        other => panic!("unknown worker role {other}"),
    }
}

/// A consumer as a user writes it, with the glue: decode, begin, call the transactional
/// handler, commit; `settle` acks after the commit. Every delivery and what became of it is
/// appended to the shared log.
async fn tx_worker(args: &[String]) {
    let (queue, table, effects, run, log) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let me: i64 = args[5].parse().unwrap();
    let prefetch: u16 = args[6].parse().unwrap();
    let log = PathBuf::from(log);
    let conn = rabbit().await.expect("the parent reached RabbitMQ");
    let pool = pg().await.expect("the parent reached PostgreSQL");
    let store = PgStore::with_table(pool.clone(), table).unwrap();
    let glue = Glue::builder(queue)
        .policy(Policy::default())
        .build(&conn)
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            format!("worker-{me}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    append_line(&log, &format!("{} {me} - -1 0 ready", now_ms()));
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = stop_tx.send(());
    });
    loop {
        let delivery = tokio::select! {
            _ = &mut stop => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => d,
                _ => break,
            },
        };
        let mid = delivery
            .properties
            .message_id()
            .as_ref()
            .map_or_else(|| "-".to_owned(), |m| m.to_string());
        let order = serde_json::from_slice::<Order>(&delivery.data).map_or(-1, |o| o.order_id);
        let returns = header_int(&delivery, "x-delivery-count").unwrap_or(0);
        let line = |event: &str| {
            format!(
                "{} {me} {mid} {order} {} {event}",
                now_ms(),
                u8::from(delivery.redelivered)
            )
        };
        append_line(&log, &line(&format!("deliver:{returns}")));
        let settled = glue
            .settle(&delivery, async {
                let o: Order = serde_json::from_slice(&delivery.data)?;
                let mut tx = pool.begin().await?;
                let c =
                    coupon_tx(&store, &mut tx, run, o.order_id, effects, me, o.pause_ms).await?;
                tx.commit().await?;
                append_line(&log, &line("committed"));
                Ok::<_, AppError>(c)
            })
            .await;
        match settled {
            Ok(s) => append_line(&log, &line(&label(&s))),
            Err(e) => {
                eprintln!("worker {me}: {e}");
                break;
            }
        }
    }
    let _ = channel.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
}

/// `messages` (ready + unacknowledged) of every queue whose name starts with `prefix`, as the
/// broker counts them (`rabbitmqctl`: the only view of unacknowledged messages).
fn broker_messages(prefix: &str) -> Vec<(String, u64)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, n) = (f.next()?, f.next()?.parse().ok()?);
            name.starts_with(prefix).then(|| (name.to_owned(), n))
        })
        .collect()
}

/// Per message id: how many times it was delivered.
fn deliveries_per_message(lines: &[Line]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in lines.iter().filter(|l| l.event.starts_with("deliver")) {
        *m.entry(l.message_id.clone()).or_insert(0) += 1;
    }
    m
}

struct Setup {
    conn: lapin::Connection,
    pool: idem_runtime::sqlx::PgPool,
    channel: lapin::Channel,
    queue: String,
    table: String,
    effects: String,
    log: PathBuf,
    args: Vec<String>,
}

async fn setup(name: &str) -> Option<Setup> {
    let conn = rabbit().await?;
    let pool = pg().await?;
    let (queue, table, effects, run) = (
        unique(name),
        unique("idem_rmq"),
        unique("eff"),
        unique("run"),
    );
    create_effects(&pool, &effects).await;
    drop(pg_store(&pool, &table).await);
    let (channel, _glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let log = log_path(&queue);
    let args = vec![
        queue.clone(),
        table.clone(),
        effects.clone(),
        run,
        log.display().to_string(),
    ];
    Some(Setup {
        conn,
        pool,
        channel,
        queue,
        table,
        effects,
        log,
        args,
    })
}

impl Setup {
    fn worker(&self, me: usize, prefetch: u16) -> Child {
        let mut args = self.args.clone();
        args.push(me.to_string());
        args.push(prefetch.to_string());
        spawn_worker("tx", &args)
    }

    async fn clean(self) {
        delete_all(&self.channel, &self.queue).await;
        drop_table(&self.pool, &self.effects).await;
        drop_store(&self.pool, &self.table).await;
        let _ = std::fs::remove_file(&self.log);
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Wait (polling the consumers' log, a signal they write) until `cond` holds, at most `limit`.
fn wait_for_log(log: &Path, limit: Duration, cond: impl Fn(&[Line]) -> bool) -> Vec<Line> {
    let deadline = Instant::now() + limit;
    loop {
        let lines = read_log(log);
        if cond(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "timed out; log so far: {lines:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Scenario 3: Duplicates arrive while the first delivery is being handled, across three consumer
/// processes: one effect; each duplicate is deferred (never acked before the holder commits)
/// and then acked as a replay.
#[test]
fn duplicates_racing_a_running_holder_across_processes_are_deferred_then_replayed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(s) = rt.block_on(setup("idem_rmq_race")) else {
        return;
    };
    let mut workers = Workers((0..3).map(|w| s.worker(w, 16)).collect());
    let slow = serde_json::to_vec(&Order {
        order_id: 3,
        amount: 0,
        pause_ms: 1500,
    })
    .unwrap();
    // Every consumer is consuming before the first message goes out (each logs `ready`).
    wait_for_log(&s.log, Duration::from_secs(30), |l| {
        l.iter().filter(|l| l.event == "ready").count() == 3
    });
    rt.block_on(publish(&s.channel, &s.queue, "first", &slow));
    wait_for_log(&s.log, Duration::from_secs(30), |l| {
        l.iter().any(|l| l.message_id == "first")
    });
    for i in 1..=4 {
        rt.block_on(publish(&s.channel, &s.queue, &format!("dup-{i}"), &slow));
    }
    let lines = wait_for_log(&s.log, Duration::from_secs(60), |l| {
        l.iter().filter(|l| l.event.starts_with("acked:")).count() == 5
    });
    workers.stop();
    // Whichever delivery claimed the key first is the holder (usually "first"; a duplicate may
    // claim before it, as the broker hands them out). Replays commit their (empty) transaction
    // too: the holder's commit is the committed line of the executed one.
    let executed: Vec<_> = lines
        .iter()
        .filter(|l| l.event == "acked:executed")
        .collect();
    assert_eq!(executed.len(), 1, "{lines:#?}");
    let holder = executed[0].message_id.clone();
    let commit = lines
        .iter()
        .find(|l| l.message_id == holder && l.event == "committed")
        .unwrap()
        .ms;
    let deferred = lines
        .iter()
        .filter(|l| l.event == "redelivered:in_flight")
        .count();
    let ids = ["first", "dup-1", "dup-2", "dup-3", "dup-4"];
    for id in ids.iter().filter(|id| **id != holder) {
        let acked: Vec<_> = lines
            .iter()
            .filter(|l| l.message_id == *id && l.event.starts_with("acked:"))
            .collect();
        assert_eq!(acked.len(), 1, "{id}: {lines:#?}");
        assert_eq!(acked[0].event, "acked:replayed", "{id}");
        assert!(
            acked[0].ms >= commit,
            "{id} was acked before the holder committed"
        );
        // Deferred as in flight, or it waited in the holder's own prefetch until after the commit.
        let in_flight = lines
            .iter()
            .any(|l| l.message_id == *id && l.event == "redelivered:in_flight");
        let first_seen = lines.iter().find(|l| l.message_id == *id).unwrap().ms;
        assert!(in_flight || first_seen >= commit, "{id}: {lines:#?}");
    }
    assert!(
        deferred >= 1,
        "no duplicate reached another process: {lines:#?}"
    );
    let effects = rt.block_on(effect_count(&s.pool, &s.effects));
    assert_eq!(effects, 1);
    let left: u64 = broker_messages(&s.queue).iter().map(|(_, n)| n).sum();
    assert_eq!(left, 0, "messages left in the broker");
    let per = deliveries_per_message(&lines);
    let redelivered = redeliveries_per_message(&lines);
    let deliveries: usize = per.values().sum();
    let acks = lines
        .iter()
        .filter(|l| l.event.starts_with("acked:"))
        .count();
    row(
        "3 duplicates race a running holder (3 processes)",
        "PostgreSQL tx",
        deliveries,
        effects,
        acks,
        redelivered.values().sum(),
        0,
    );
    rt.block_on(s.clean());
}

/// Per message id: its redeliveries as the broker made them, including those no handler saw (a
/// killed consumer returns its whole prefetch): the copies the glue published (one per
/// `redelivered:*` settle), plus, for each copy, the highest `x-delivery-count` a consumer saw
/// on it (the quorum queue's count of that copy's returns).
fn redeliveries_per_message(lines: &[Line]) -> std::collections::BTreeMap<String, usize> {
    use std::collections::BTreeMap;
    let mut copy: BTreeMap<&str, usize> = BTreeMap::new();
    let mut returns: BTreeMap<(&str, usize), usize> = BTreeMap::new();
    for l in lines {
        let id = l.message_id.as_str();
        let c = *copy.entry(id).or_insert(0);
        if let Some(r) = l.event.strip_prefix("deliver:") {
            let r: usize = r.parse().unwrap();
            let e = returns.entry((id, c)).or_insert(0);
            *e = (*e).max(r);
        } else if l.event.starts_with("redelivered:") {
            copy.insert(id, c + 1);
        }
    }
    copy.iter()
        .map(|(id, copies)| {
            let r: usize = (0..=*copies)
                .map(|c| returns.get(&(*id, c)).copied().unwrap_or(0))
                .sum();
            ((*id).to_owned(), copies + r)
        })
        .collect()
}

const KILL_ORDERS: i64 = 120;
const KILL_COPIES: usize = 3;
const KILL_WORKERS: usize = 3;
const KILLS: usize = 40;
/// The killed consumers' prefetch. Each kill hands the victim's whole prefetch back to the queue
/// (on a quorum queue, `x-delivery-count` + 1 for each, handled or not), so the messages at the
/// head of the queue collect a return per kill: with 16 and 40 kills in 4 s, up to 9-10 returns
/// of one message were measured, the broker's doing and not the glue's. A consumer that handles
/// one delivery at a time gains nothing from more than a few.
const KILL_PREFETCH: u16 = 4;

/// Scenario 2: Consumer processes killed with SIGKILL at random moments (after the effect and before the
/// ack among them) and restarted, many times, until every message is acked: one effect row per
/// order, none missing, nothing left in the broker (ready or unacked, in the queue, its delay
/// queues or its dead-letter queue), and at most 10 redeliveries of any one message (the broker's returns and the glue's copies
/// together), on a quorum queue with RabbitMQ 4's default delivery limit of 20.
#[test]
fn consumers_killed_at_random_apply_each_effect_once_with_few_redeliveries() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(s) = rt.block_on(setup("idem_rmq_kill")) else {
        return;
    };
    let seed = std::env::var("IDEM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| now_ms() as u64);
    eprintln!("IDEM_SEED={seed}");
    let mut rng = seed | 1;
    let mut below = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Every order three times with new message ids, shuffled; each order has its own pause.
    let mut stream: Vec<i64> = (0..KILL_ORDERS * KILL_COPIES as i64)
        .map(|i| i % KILL_ORDERS)
        .collect();
    for i in (1..stream.len()).rev() {
        stream.swap(i, below(i as u64 + 1) as usize);
    }
    let pauses: Vec<u64> = (0..KILL_ORDERS).map(|_| below(40)).collect();
    rt.block_on(async {
        for (seq, order) in stream.iter().enumerate() {
            let body = serde_json::to_vec(&Order {
                order_id: *order,
                amount: 0,
                pause_ms: pauses[*order as usize],
            })
            .unwrap();
            publish(&s.channel, &s.queue, &format!("m-{seq}"), &body).await;
        }
    });
    let mut workers = Workers(
        (0..KILL_WORKERS)
            .map(|w| s.worker(w, KILL_PREFETCH))
            .collect(),
    );
    let started = Instant::now();
    for _ in 0..KILLS {
        // Random moments, from the seed printed above.
        std::thread::sleep(Duration::from_millis(20 + below(180)));
        let victim = below(KILL_WORKERS as u64) as usize;
        workers.0[victim].kill().unwrap(); // SIGKILL
        workers.0[victim].wait().unwrap();
        workers.0[victim] = s.worker(victim, KILL_PREFETCH);
    }
    // Until every message is acked: nothing ready or unacked in the queue and its delay queues.
    let deadline = started + Duration::from_secs(150);
    loop {
        let left: u64 = broker_messages(&s.queue).iter().map(|(_, n)| n).sum();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} messages still in the broker"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    workers.stop();
    let lines = read_log(&s.log);
    let per_order = rt.block_on(effects_per_order(&s.pool, &s.effects));
    let twice: Vec<_> = per_order.iter().filter(|(_, n)| *n != 1).collect();
    assert!(
        twice.is_empty(),
        "effects applied more than once: {twice:?}"
    );
    assert_eq!(
        per_order.len(),
        KILL_ORDERS as usize,
        "some orders have no effect"
    );
    let left = broker_messages(&s.queue);
    assert!(
        left.iter().all(|(_, n)| *n == 0),
        "left in the broker: {left:?}"
    );
    let per = deliveries_per_message(&lines);
    assert_eq!(per.len(), stream.len(), "some message was never delivered");
    let redelivered = redeliveries_per_message(&lines);
    let (worst_id, worst) = redelivered.iter().max_by_key(|(_, n)| **n).unwrap();
    let max_returns = lines
        .iter()
        .filter_map(|l| l.event.strip_prefix("deliver:")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let deliveries: usize = per.values().sum();
    let acks = lines
        .iter()
        .filter(|l| l.event.starts_with("acked:"))
        .count();
    let executed = lines.iter().filter(|l| l.event == "acked:executed").count();
    eprintln!(
        "{KILLS} kills; {deliveries} deliveries of {} messages; {executed} commits; most \
         redelivered: {worst_id} {worst} times; highest x-delivery-count seen: {max_returns}; {:.1} s",
        per.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        *worst <= 10,
        "{worst_id} was redelivered {worst} times (over 10)"
    );
    row(
        "2 consumers SIGKILLed at random (40 kills, 3 processes)",
        "PostgreSQL tx",
        deliveries,
        per_order.iter().map(|(_, n)| n).sum(),
        acks,
        redelivered.values().sum(),
        0,
    );
    rt.block_on(s.clean());
}
