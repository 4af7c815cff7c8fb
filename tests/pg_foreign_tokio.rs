//! `#[idempotent(tx = "tx")]` on a `tokio_postgres::Transaction` (feature `tokio-postgres`): the
//! done mark is written in the caller's tokio-postgres transaction, through a
//! `SqlStore<Postgres>`. Effects are rows in the database. PostgreSQL: `POSTGRES_URL`.
#[path = "pg_foreign/mod.rs"]
mod pg_foreign;
#[cfg(feature = "redis")]
mod redis_support;
#[path = "support/sql.rs"]
mod sql;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem_runtime::{Error, MemoryStore, PgStore, SqliteStore, Store, idempotent};
use pg_foreign::{Setup, url};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pg(#[from] idem_runtime::PgError),
    #[error("the handler refused")]
    Refused,
}

/// A client of its own (tokio-postgres has no pool), its connection driven in the background.
async fn client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL reachable (the sqlx pool was)");
    tokio::spawn(conn);
    client
}

/// One delivery: writes its effect row in the caller's transaction; fails after it if `fail`.
#[idempotent(
    key = "key",
    tx = "tx",
    store = "store",
    scope = "tests.pg_foreign_tokio"
)]
async fn apply(
    store: &PgStore,
    tx: &mut tokio_postgres::Transaction<'_>,
    key: String,
    insert: &str,
    runs: &AtomicUsize,
    fail: bool,
) -> Result<u64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    tx.execute(insert, &[&key]).await?;
    if fail {
        return Err(AppError::Refused);
    }
    Ok(42)
}

#[idempotent(
    key = "key",
    tx = "tx",
    store = "store",
    scope = "tests.pg_foreign_tokio"
)]
async fn apply_on(
    store: &dyn Store,
    tx: &mut tokio_postgres::Transaction<'_>,
    key: String,
    runs: &AtomicUsize,
) -> Result<u64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    let _ = tx;
    Ok(1)
}

#[tokio::test]
async fn the_same_key_twice_runs_once_and_replays() {
    let Some(s) = Setup::new("tpg_twice").await else {
        return;
    };
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    for _ in 0..2 {
        let mut tx = client.transaction().await.unwrap();
        let out = apply(&s.store, &mut tx, "k1".into(), &s.insert(), &runs, false).await;
        assert_eq!(out.unwrap(), 42);
        tx.commit().await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(s.effects_of("k1").await, 1);
    assert_eq!(s.marks_of("k1").await, 1);
    s.drop_tables().await;
}

#[tokio::test]
async fn sixteen_concurrent_transactions_on_one_key_apply_it_once() {
    let Some(s) = Setup::new("tpg_race").await else {
        return;
    };
    let s = Arc::new(s);
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (s, runs, start) = (s.clone(), runs.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = client().await;
            let mut tx = client.transaction().await.unwrap();
            start.wait().await;
            let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
            tx.commit().await.unwrap();
            out
        }));
    }
    let mut ran_or_replayed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => {
                assert_eq!(v, 42);
                ran_or_replayed += 1;
            }
            Err(AppError::Idem(Error::InFlight { .. })) => {}
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert!(ran_or_replayed >= 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions");
    assert_eq!(s.effects_of("k").await, 1, "effect rows");
    Arc::into_inner(s).unwrap().drop_tables().await;
}

#[tokio::test]
async fn a_handler_error_rolls_its_writes_back_and_frees_the_key() {
    let Some(s) = Setup::new("tpg_err").await else {
        return;
    };
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, true).await;
    assert!(matches!(out, Err(AppError::Refused)), "{out:?}");
    // Committed anyway: nothing of the handler's is in it.
    tx.commit().await.unwrap();
    assert_eq!(s.effects_of("k").await, 0);
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
    assert_eq!(out.unwrap(), 42);
    tx.commit().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(s.effects_of("k").await, 1);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_rollback_after_ok_takes_the_effect_and_the_mark_with_it() {
    let Some(s) = Setup::new("tpg_rb").await else {
        return;
    };
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
    assert_eq!(out.unwrap(), 42);
    tx.rollback().await.unwrap();
    assert_eq!(s.effects_of("k").await, 0);
    assert_eq!(s.marks_of("k").await, 0);
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
    assert_eq!(out.unwrap(), 42);
    tx.commit().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(s.effects_of("k").await, 1);
    assert_eq!(s.marks_of("k").await, 1);
    s.drop_tables().await;
}

#[tokio::test]
async fn a_tokio_postgres_transaction_on_a_sqlite_store_is_not_transactional() {
    // Only to be sure the server is there (and fail under CI when it is not).
    let Some(_pool) = sql::postgres(1).await else {
        return;
    };
    let path = std::env::temp_dir().join(format!("idem-tpg-{}.db", std::process::id()));
    let store = SqliteStore::open(&path).await.unwrap();
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply_on(&store, &mut tx, "k".into(), &runs).await;
    match out {
        Err(AppError::Idem(Error::NotTransactional { reason })) => {
            assert!(reason.contains("tokio-postgres"), "{reason}");
            assert!(reason.contains("SQLite"), "{reason}");
        }
        other => panic!("expected NotTransactional, got {other:?}"),
    }
    // A store with no SQL table at all.
    let memory = MemoryStore::new();
    let out = apply_on(&memory, &mut tx, "k".into(), &runs).await;
    assert!(
        matches!(out, Err(AppError::Idem(Error::NotTransactional { .. }))),
        "{out:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler ran");
    tx.rollback().await.unwrap();
    drop(store);
    let _ = std::fs::remove_file(&path);
}

/// What tells the child process of the SIGKILL test apart (its table and effects table).
const CHILD_ENV: &str = "IDEM_PG_FOREIGN_CHILD";
/// What the child prints once its effect and mark are written in its open transaction.
const CHILD_READY: &str = "IDEM-CHILD-READY";

/// The child of `a_process_killed_between_the_effect_and_the_commit_leaves_neither`: runs the
/// handler in a transaction it never commits, and waits to be killed. A no-op as a test.
#[tokio::test]
async fn child_process() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (table, effects) = args.split_once(',').unwrap();
    let pool = sql::postgres(2)
        .await
        .expect("the parent reached the server");
    let store = PgStore::with_table(pool, table).unwrap();
    let insert = format!("INSERT INTO {effects} (msg_key) VALUES ($1)");
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&store, &mut tx, "k".into(), &insert, &runs, false).await;
    assert_eq!(out.unwrap(), 42);
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{CHILD_READY}").unwrap();
        stdout.flush().unwrap();
    }
    // Killed here, between the effect and the commit.
    tokio::time::sleep(std::time::Duration::from_secs(120)).await;
    panic!("the parent did not kill this process");
}

#[tokio::test]
async fn a_process_killed_between_the_effect_and_the_commit_leaves_neither() {
    use std::io::BufRead as _;
    let Some(s) = Setup::new("tpg_kill").await else {
        return;
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{},{}", s.table, s.effects))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .any(|l| l.is_ok_and(|l| l.contains(CHILD_READY)))
    })
    .await
    .unwrap();
    assert!(ready, "the child ended before its handler ran");
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    // While the child's transaction is open, a duplicate is refused at once.
    let mut tx = client.transaction().await.unwrap();
    let dup = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
    assert!(
        matches!(dup, Err(AppError::Idem(Error::InFlight { .. }))),
        "{dup:?}"
    );
    tx.rollback().await.unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The redelivery, once the server has seen the connection go (its lock and rows with it).
    let started = std::time::Instant::now();
    loop {
        let mut tx = client.transaction().await.unwrap();
        match apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await {
            Ok(v) => {
                assert_eq!(v, 42);
                tx.commit().await.unwrap();
                break;
            }
            Err(AppError::Idem(Error::InFlight { .. })) if started.elapsed().as_secs() < 10 => {
                tx.rollback().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the redelivery failed: {e:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions after the kill");
    assert_eq!(s.effects_of("k").await, 1, "effect rows");
    assert_eq!(s.marks_of("k").await, 1, "done marks");
    s.drop_tables().await;
}

/// Through a layered store (Redis in front of the `PgStore`), which forwards the caller's
/// transaction to the database: the duplicate replays once the front has settled (it answers
/// "in flight" for up to a second after the handler returned: the caller had yet to commit).
/// Needs Redis too (`REDIS_URL`): built with the `redis` feature.
#[cfg(feature = "redis")]
#[tokio::test]
async fn through_a_layered_store_the_mark_is_written_in_the_callers_transaction() {
    let Some(s) = Setup::new("tpg_layer").await else {
        return;
    };
    let Some(front) = redis_support::shared_store().await else {
        return;
    };
    let store = idem_runtime::LayeredStore::new(front, s.store.clone());
    let runs = AtomicUsize::new(0);
    // The front keeps records across runs: a key of this run's own.
    let key = format!("k-{}", s.table);
    let mut client = client().await;
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let mut tx = client.transaction().await.unwrap();
        match apply_on(&store, &mut tx, key.clone(), &runs).await {
            Ok(v) => {
                tx.commit().await.unwrap();
                answers.push(v);
            }
            Err(AppError::Idem(Error::InFlight { .. })) if started.elapsed().as_secs() < 5 => {
                tx.rollback().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!(answers, [1, 1]);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "executions");
    assert_eq!(s.marks_of(&key).await, 1, "done marks");
    s.drop_tables().await;
}

/// The same on a MySQL/MariaDB store (`MYSQL_URL`): built with the `mysql` feature.
#[cfg(feature = "mysql")]
#[tokio::test]
async fn a_tokio_postgres_transaction_on_a_mysql_store_is_not_transactional() {
    let Some(_pool) = sql::postgres(1).await else {
        return;
    };
    let Some(mysql) = sql::mysql(2).await else {
        return;
    };
    let store = idem_runtime::MySqlStore::new(mysql);
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply_on(&store, &mut tx, "k".into(), &runs).await;
    match out {
        Err(AppError::Idem(Error::NotTransactional { reason })) => {
            assert!(reason.contains("tokio-postgres"), "{reason}");
            assert!(reason.contains("MySQL"), "{reason}");
        }
        other => panic!("expected NotTransactional, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler ran");
    tx.rollback().await.unwrap();
}

/// A handler written against `&mut dyn PgTransaction` (what a library idem has no feature for
/// would implement), given a tokio-postgres transaction.
#[idempotent(
    key = "key",
    tx = "tx",
    store = "store",
    scope = "tests.pg_foreign_dyn"
)]
async fn apply_dyn(
    store: &PgStore,
    tx: &mut dyn idem_runtime::PgTransaction,
    key: String,
    insert: &str,
    runs: &AtomicUsize,
) -> Result<u64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    tx.execute(insert, &[idem_runtime::Param::Text(Some(&key))])
        .await?;
    Ok(7)
}

#[tokio::test]
async fn a_dyn_pg_transaction_parameter_runs_once_and_replays() {
    let Some(s) = Setup::new("tpg_dyn").await else {
        return;
    };
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    for _ in 0..2 {
        let mut tx = client.transaction().await.unwrap();
        let out = apply_dyn(&s.store, &mut tx, "k".into(), &s.insert(), &runs).await;
        assert_eq!(out.unwrap(), 7);
        tx.commit().await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(s.effects_of("k").await, 1);
    assert_eq!(s.marks_of("k").await, 1);
    s.drop_tables().await;
}

/// A lease that lapsed (a plain claim, never completed: a crashed holder of the non-transactional
/// form) is taken over by the transactional call on tokio-postgres: the takeover statement and
/// the lease's refresh run through the caller's transaction too.
#[tokio::test]
async fn a_lapsed_lease_is_taken_over_in_the_callers_transaction() {
    use idem_runtime::{Begin, BeginRequest, Key, Token};
    let Some(s) = Setup::new("tpg_to").await else {
        return;
    };
    let key = Key::new("k").unwrap();
    let lapsing = BeginRequest {
        scope: "tests.pg_foreign_tokio",
        key: &key,
        token: Token::generate(),
        ttl: std::time::Duration::from_millis(50),
        fingerprint: None,
    };
    let first = s.store.begin(&lapsing).await.unwrap();
    assert!(matches!(first, Begin::Acquired(_)), "{first:?}");
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let runs = AtomicUsize::new(0);
    let mut client = client().await;
    let mut tx = client.transaction().await.unwrap();
    let out = apply(&s.store, &mut tx, "k".into(), &s.insert(), &runs, false).await;
    assert_eq!(out.unwrap(), 42);
    tx.commit().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(s.effects_of("k").await, 1);
    assert_eq!(s.marks_of("k").await, 1);
    s.drop_tables().await;
}
