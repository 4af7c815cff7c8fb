//! The SQL store on SQLite, on a file (in cargo's per-target temporary directory): the whole
//! conformance suite, migrations, purge, the transactional mode, and several worker processes
//! (racing, and killed with SIGKILL) on one database file.
mod sql_common;

use idem_runtime::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

/// One file per test (shared with the test's worker processes): SQLite has one writer at a time,
/// so tests sharing a file would slow each other's lease renewals down.
async fn connect() -> Option<idem_runtime::sqlx::SqlitePool> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("idem-{}.sqlite", sql_common::test_name()));
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .expect("open the SQLite file");
    Some(pool)
}

crate::sql_store_tests!(
    idem_runtime::sqlx::Sqlite,
    connect,
    sql_common::Dialect {
        text: "TEXT",
        serial_pk: "INTEGER PRIMARY KEY AUTOINCREMENT",
        placeholder: sql_common::question,
    }
);

/// A pool of one connection (common on SQLite) that the handler holds while it runs: renewals
/// used to wait for that connection and time out, so the lease lapsed and a duplicate from
/// another process ran the handler a second time. The watchdog now renews through a connection
/// of its own.
#[tokio::test]
async fn renewals_do_not_wait_for_the_applications_pool() {
    use std::time::Duration;

    use idem_runtime::{Call, Error, Options, SqliteStore, current_lease, run};

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-one-connection.sqlite");
    let _ = std::fs::remove_file(&path);
    let one_connection = || async {
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .expect("open the SQLite file")
    };
    let pool = one_connection().await;
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    // Another process's store on the same file.
    let other = SqliteStore::new(one_connection().await);

    let opts = Options::new("sql_sqlite::one_connection").ttl(Duration::from_millis(300));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (store, opts, pool) = (store.clone(), opts.clone(), pool.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("order-1"), || async move {
                let lease = current_lease().expect("inside a handler");
                // The handler's own work holds the pool's only connection.
                let conn = pool.acquire().await.expect("the pool's connection");
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                let lost = lease.is_lost();
                drop(conn);
                Ok::<_, Error>(lost)
            })
            .await
        })
    };
    started_rx.await.unwrap();
    // Six ttls: without renewals the lease would have lapsed five times over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        let dup: Result<bool, Error> =
            run(&other, &opts, Call::new("order-1"), || async { Ok(true) }).await;
        assert!(matches!(dup, Err(Error::InFlight { .. })), "{dup:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish_tx.send(()).unwrap();
    let lost = holder.await.unwrap().expect("the holder completes");
    assert!(!lost, "the lease was lost while the handler ran");
}

/// The transactional form on a pool of one connection (which the transaction holds): duplicates
/// replay without waiting for another connection.
#[tokio::test]
async fn a_duplicate_in_a_transaction_replays_with_one_connection() {
    use std::time::Duration;

    use idem_runtime::{Call, Error, Options, SqliteStore};

    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-tx-one-connection.sqlite");
    let _ = std::fs::remove_file(&path);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal),
        )
        .await
        .expect("open the SQLite file");
    let store = SqliteStore::new(pool);
    store.migrate().await.unwrap();
    let opts = Options::new("sql_sqlite::tx_one_connection");
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    for _ in 0..3 {
        let runs = runs.clone();
        let out: Result<u32, Error> = store
            .run_in_tx(&opts, Call::new("order-1"), move |_tx| {
                Box::pin(
                    async move { Ok(runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1) },
                )
            })
            .await;
        assert_eq!(
            out.unwrap(),
            1,
            "the duplicates replay the first run's output"
        );
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A transactional duplicate that waits (`wait`) for a key in flight used to wait inside its
/// transaction, which held SQLite's write lock from its claim: the holder's renewals and mark
/// stalled on that lock, its lease lapsed, and the waiter took the key over and ran the handler a
/// second time. On SQLite such a duplicate is answered in flight at once instead.
#[tokio::test]
async fn a_transactional_duplicate_does_not_wait_holding_the_write_lock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use idem_runtime::{Call, Error, Options, SqliteStore, run};

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-tx-wait.sqlite");
    let _ = std::fs::remove_file(&path);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await
        .expect("open the SQLite file");
    let store = SqliteStore::new(pool);
    store.migrate().await.unwrap();
    let opts = Options::new("sql_sqlite::tx_wait")
        .ttl(Duration::from_secs(1))
        .wait(Duration::from_secs(8));
    let runs = Arc::new(AtomicU32::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (store, opts, runs) = (store.clone(), opts.clone(), runs.clone());
        tokio::spawn(async move {
            run(&store, &opts, Call::new("order-1"), || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(());
                let _ = finish_rx.await;
                Ok::<_, Error>(1_u32)
            })
            .await
        })
    };
    started_rx.await.unwrap();
    let r = runs.clone();
    let waiter = tokio::time::timeout(
        Duration::from_secs(6),
        store.run_in_tx(&opts, Call::new("order-1"), move |_tx| {
            Box::pin(async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2_u32)
            })
        }),
    )
    .await
    .expect("the duplicate waited in its transaction");
    assert!(matches!(waiter, Err(Error::InFlight { .. })), "{waiter:?}");
    finish_tx.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
    // Once done, the transactional duplicate replays.
    let again: Result<u32, Error> = store
        .run_in_tx(&opts, Call::new("order-1"), |_tx| Box::pin(async { Ok(3) }))
        .await;
    assert_eq!(again.unwrap(), 1);
}

/// Databases that live in memory (or in a temporary file) exist only for their own pool's
/// connections: a watchdog connection of its own would renew in another, empty database, every
/// renewal would fail, the lease would lapse, and a duplicate would run. They renew through
/// their own pool.
#[tokio::test]
async fn renewals_of_in_memory_databases_reach_them() {
    use std::time::Duration;

    use idem_runtime::{Call, Error, Options, SqliteStore, current_lease, run};

    for url in [
        "sqlite::memory:",
        "sqlite:file::memory:",
        "sqlite:idem-private?mode=memory&cache=private",
        "sqlite:file:idem-shared?mode=memory&cache=shared",
        "sqlite:",
    ] {
        let connect: SqliteConnectOptions = url.parse().unwrap();
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await
            .unwrap();
        let store = SqliteStore::new(pool);
        store.migrate().await.unwrap();
        let opts = Options::new("sql_sqlite::in_memory").ttl(Duration::from_millis(300));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let (store, opts) = (store.clone(), opts.clone());
            tokio::spawn(async move {
                run(&store, &opts, Call::new("order-1"), || async move {
                    let lease = current_lease().expect("inside a handler");
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, Error>(lease.is_lost())
                })
                .await
            })
        };
        started_rx.await.unwrap();
        // Five ttls: without renewals the lease would have lapsed four times over.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while tokio::time::Instant::now() < deadline {
            let dup: Result<bool, Error> =
                run(&store, &opts, Call::new("order-1"), || async { Ok(true) }).await;
            assert!(matches!(dup, Err(Error::InFlight { .. })), "{url}: {dup:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        finish_tx.send(()).unwrap();
        let lost = holder.await.unwrap().expect("the holder completes");
        assert!(!lost, "{url}: the lease was lost while the handler ran");
    }
}

/// Several consumers started at once on a file that does not exist yet (what two quick starts
/// started together do): switching the new file to WAL answered "database is locked" at once to
/// all but one of them, and `SqliteStore::open` failed. Each open now succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opened_at_once_on_a_new_file_all_open() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-open-at-once");
    std::fs::create_dir_all(&dir).unwrap();
    for round in 0..20 {
        let path = dir.join(format!("round-{round}.sqlite"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let opens: Vec<_> = (0..6)
            .map(|_| tokio::spawn(idem_runtime::SqliteStore::open(path.clone())))
            .collect();
        for open in opens {
            if let Err(e) = open.await.unwrap() {
                panic!("round {round}: {e}");
            }
        }
    }
}

/// A transactional duplicate of a key done and committed is answered from a plain read, without
/// SQLite's write lock: it used to claim first (a write), so every duplicate queued behind any
/// writer of the database (33 ms at the 99th percentile at 16 tasks). Here another connection
/// holds the write lock the whole time: the duplicates (owned transaction, the caller's own, and
/// one with another payload) are answered all the same, and the handler never runs again.
#[tokio::test]
async fn a_transactional_duplicate_of_a_done_key_does_not_wait_for_the_write_lock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use idem_runtime::sqlx::Connection;
    use idem_runtime::{Call, Error, Fingerprint, Options, SqliteStore};

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-tx-done-read.sqlite");
    let _ = std::fs::remove_file(&path);
    let connect = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(20));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(connect.clone())
        .await
        .expect("open the SQLite file");
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let opts = Options::new("sql_sqlite::tx_done_read");
    let runs = Arc::new(AtomicU32::new(0));
    let call = || Call::new("order-1").fingerprint(Fingerprint::of(&"pay 10"));
    let r = runs.clone();
    let first: Result<u32, Error> = store
        .run_in_tx(&opts, call(), move |_tx| {
            Box::pin(async move { Ok(r.fetch_add(1, Ordering::SeqCst) + 7) })
        })
        .await;
    assert_eq!(first.unwrap(), 7);

    let mut writer = idem_runtime::sqlx::SqliteConnection::connect_with(&connect)
        .await
        .unwrap();
    idem_runtime::sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut writer)
        .await
        .unwrap();
    // Well inside the 20 s a claim would wait for the lock.
    let bound = Duration::from_secs(5);
    macro_rules! handler {
        () => {{
            let runs = runs.clone();
            move |_tx: &mut _| {
                Box::pin(async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, Error>(0)
                })
            }
        }};
    }
    let owned = tokio::time::timeout(bound, store.run_in_tx(&opts, call(), handler!()))
        .await
        .expect("the owned transaction's duplicate waited for the write lock");
    assert_eq!(owned.unwrap(), 7);
    let tx = pool.begin().await.unwrap();
    let callers = tokio::time::timeout(bound, store.run_with_tx(tx, &opts, call(), handler!()))
        .await
        .expect("the caller's transaction's duplicate waited for the write lock");
    assert_eq!(callers.unwrap(), 7);
    let other = Call::new("order-1").fingerprint(Fingerprint::of(&"pay 99"));
    let mismatch = tokio::time::timeout(bound, store.run_in_tx(&opts, other, handler!()))
        .await
        .expect("the duplicate with another payload waited for the write lock");
    assert!(
        matches!(mismatch, Err(Error::Mismatch { .. })),
        "{mismatch:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
    idem_runtime::sqlx::raw_sql("ROLLBACK")
        .execute(&mut writer)
        .await
        .unwrap();
}

/// Review: the committed-done read (`committed_done`, "a read that never waits for one") is made
/// for every transactional call on SQLite, before its claim, through the store's side pool. On a
/// database in rollback-journal mode (SQLite's default) a caller's transaction that holds the
/// EXCLUSIVE lock (`BEGIN EXCLUSIVE`, or any transaction whose writes spilled from the page
/// cache) keeps every reader out: the read waited for that very transaction, which waits for the
/// call, for the whole `busy_timeout`, then failed, and only then did the call claim in the
/// transaction as before. Every call, duplicates or not, paid the busy timeout.
#[tokio::test]
async fn a_transactional_call_in_an_exclusive_transaction_does_not_wait_for_its_own_lock() {
    use std::time::{Duration, Instant};

    use idem_runtime::{Call, Error, Options, SqliteStore};

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-tx-exclusive.sqlite");
    let _ = std::fs::remove_file(&path);
    let connect = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Delete)
        .busy_timeout(Duration::from_secs(4));
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(connect)
        .await
        .expect("open the SQLite file");
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let opts = Options::new("sql_sqlite::tx_exclusive");
    for n in 0..2 {
        let tx = pool.begin_with("BEGIN EXCLUSIVE").await.unwrap();
        let started = Instant::now();
        let out: Result<u32, Error> = store
            .run_with_tx(tx, &opts, Call::new(&format!("order-{n}")), |_tx| {
                Box::pin(async move { Ok(n) })
            })
            .await;
        assert_eq!(out.unwrap(), n);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the call waited {:?} for its own transaction's lock",
            started.elapsed()
        );
    }
}

/// Review: a key marked done in the caller's transaction, not committed yet, is invisible to the
/// committed-done read (another connection): a second call on it in the same transaction goes on
/// to the claim in the transaction, which sees the call's own mark (a replay, or a mismatch for
/// another payload). Once committed, the read answers the same, before any claim.
#[idem_runtime::idempotent(
    key = "order",
    tx = "tx",
    store = "store",
    scope = "sql_sqlite.same_key_in_one_tx",
    fingerprint = "amount"
)]
async fn pay_in_tx(
    store: &idem_runtime::SqliteStore,
    tx: &mut idem_runtime::sqlx::Transaction<'_, idem_runtime::sqlx::Sqlite>,
    order: String,
    amount: u32,
    runs: &std::sync::atomic::AtomicU32,
) -> Result<u32, idem_runtime::Error> {
    let _ = (&store, &tx);
    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(amount)
}

#[tokio::test]
async fn a_key_marked_in_the_callers_transaction_is_answered_by_its_own_mark() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use idem_runtime::{Error, SqliteStore};

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-tx-same-key.sqlite");
    let _ = std::fs::remove_file(&path);
    let connect = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(connect)
        .await
        .expect("open the SQLite file");
    let store = SqliteStore::new(pool.clone());
    store.migrate().await.unwrap();
    let runs = AtomicU32::new(0);
    let mut tx = pool.begin().await.unwrap();
    let first = pay_in_tx(&store, &mut tx, "o-1".into(), 10, &runs).await;
    assert_eq!(first.unwrap(), 10);
    let again = pay_in_tx(&store, &mut tx, "o-1".into(), 10, &runs).await;
    assert_eq!(again.unwrap(), 10);
    let other = pay_in_tx(&store, &mut tx, "o-1".into(), 99, &runs).await;
    assert!(matches!(other, Err(Error::Mismatch { .. })), "{other:?}");
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let later = pay_in_tx(&store, &mut tx, "o-1".into(), 10, &runs).await;
    assert_eq!(later.unwrap(), 10);
    let other = pay_in_tx(&store, &mut tx, "o-1".into(), 99, &runs).await;
    assert!(matches!(other, Err(Error::Mismatch { .. })), "{other:?}");
    tx.rollback().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
}
