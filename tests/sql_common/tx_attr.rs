//! The transactional attribute on one database: the caller begins and commits (see
//! `sql_store_tests!`, which stamps this out beside the rest).

/// The tests of `#[idempotent(tx = "...")]` on one database. Expanded by `sql_store_tests!`, in
/// the same module as its helpers.
#[macro_export]
macro_rules! sql_tx_attr_tests {
    ($db:ty, $connect:ident) => {
        // ---- The transactional attribute: the caller begins and commits ----

        /// The database, by sqlx's name for it: "PostgreSQL", "MySQL" (MariaDB too), "SQLite".
        fn db_name() -> &'static str {
            <$db as sqlx::Database>::NAME
        }

        /// Whether the claim is made in the caller's transaction (PostgreSQL, SQLite), or as a
        /// lease on another connection that idem renews (MySQL/MariaDB).
        fn claims_in_tx() -> bool {
            db_name() != "MySQL"
        }

        /// The business table's rows, in insertion order: (message key, worker).
        async fn effect_rows(pool: &sqlx::Pool<$db>, effects: &str) -> Vec<(String, i64)> {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT msg_key, worker FROM {effects} ORDER BY id"
            )))
            .fetch_all(pool)
            .await
            .unwrap()
        }

        async fn drop_tables(pool: &sqlx::Pool<$db>, idem_table: &str, effects: &str) {
            for t in [effects, idem_table, &format!("{idem_table}_migrations")] {
                exec(pool, format!("DROP TABLE {t}")).await;
            }
        }

        /// Begin a transaction the way `mode` says, on `conn`.
        async fn begin_mode<'c>(
            conn: &'c mut <$db as sqlx::Database>::Connection,
            mode: &$crate::sql_common::TxMode,
            effects: &str,
        ) -> sqlx::Transaction<'c, $db> {
            for statement in mode.setup {
                sqlx::raw_sql(*statement).execute(&mut *conn).await.unwrap();
            }
            let mut tx = match mode.begin {
                Some(begin) => sqlx::Connection::begin_with(conn, begin).await,
                None => sqlx::Connection::begin(conn).await,
            }
            .unwrap();
            if mode.read_first {
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                    "SELECT count(*) FROM {effects}"
                )))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            }
            tx
        }

        /// One delivery: the effect row, in the caller's transaction; returns the worker that ran.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_attr",
            ttl = "1s"
        )]
        async fn tx_apply(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            Ok(worker)
        }

        /// A handler whose done mark will fail: after its effect it hands the key's row to another
        /// token, in its own transaction, as a holder that took over would have.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_attr_stolen",
            ttl = "30s"
        )]
        async fn tx_apply_and_lose(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(9_i64)
                .execute(&mut **tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {} SET token = {} WHERE idem_key = {}",
                store.table(),
                DIALECT.p(1),
                DIALECT.p(2)
            )))
            .bind(vec![0u8; 16])
            .bind(&key)
            .execute(&mut **tx)
            .await?;
            Ok(9)
        }

        /// A failed mark undoes the handler's writes only: the caller's own writes in the same
        /// transaction, before the call and after it, are kept, also when the handler ran in a
        /// nested transaction (a savepoint of the caller's) that the caller then rolls back.
        /// (idem used to roll the whole transaction back on the server.)
        #[tokio::test]
        async fn tx_attr_failed_mark_keeps_the_callers_other_writes() {
            let table = unique("idem_txkeep");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let insert = insert_effect(&effects);
            let mut outer = pool.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(insert.clone()))
                .bind("caller-before")
                .bind(0_i64)
                .execute(&mut *outer)
                .await
                .unwrap();
            let mut nested = sqlx::Connection::begin(&mut *outer).await.unwrap();
            let out = tx_apply_and_lose(&store, &mut nested, "m-5".into(), &effects).await;
            assert!(
                matches!(out, Err(AppError::Idem(Error::LeaseLost { .. }))),
                "the mark should have found the key taken: {out:?}"
            );
            nested
                .rollback()
                .await
                .expect("the caller's savepoint survives");
            sqlx::query(AssertSqlSafe(insert))
                .bind("caller-after")
                .bind(0_i64)
                .execute(&mut *outer)
                .await
                .unwrap();
            outer.commit().await.unwrap();
            let mut rows = effect_rows(&pool, &effects).await;
            rows.sort();
            assert_eq!(
                rows,
                [
                    ("caller-after".to_owned(), 0),
                    ("caller-before".to_owned(), 0)
                ],
                "the handler's effect was kept, or the caller's own writes lost"
            );
            drop_tables(&pool, &table, &effects).await;
        }

        /// Holds a handler inside its body (after its write) until the test lets it go.
        struct Hold {
            started: tokio::sync::oneshot::Sender<::idem_runtime::CurrentLease>,
            release: tokio::sync::oneshot::Receiver<()>,
        }

        /// A handler with a short lease renewed for one second at most (`max_lease`): held past
        /// that, a lease on another connection lapses.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_held",
            ttl = "300ms",
            max_lease = "1s"
        )]
        async fn tx_apply_held(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
            hold: Option<Hold>,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            if let Some(hold) = hold {
                let lease = ::idem_runtime::current_lease().expect("inside the handler");
                let _ = hold.started.send(lease);
                let _ = hold.release.await;
            }
            Ok(worker)
        }

        /// The lease of `tx_apply_long`.
        const LONG_TTL: Duration = Duration::from_millis(300);

        /// Steers a long handler: it says when it is two ttls in, and may wait there for the
        /// test's duplicate to be answered before its last ttl.
        struct Long {
            halfway: tokio::sync::oneshot::Sender<()>,
            dup_answered: Option<tokio::sync::oneshot::Receiver<()>>,
        }

        /// A handler that runs for three times its ttl (`LONG_TTL`, renewed all along).
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_long",
            ttl = "300ms"
        )]
        async fn tx_apply_long(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            worker: i64,
            script: Option<Long>,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
            if let Some(script) = script {
                // The workload: three ttls in all.
                tokio::time::sleep(2 * LONG_TTL).await;
                let _ = script.halfway.send(());
                if let Some(answered) = script.dup_answered {
                    let _ = answered.await;
                }
                tokio::time::sleep(LONG_TTL).await;
            }
            Ok(worker)
        }

        /// Through the attribute, the caller committing: three deliveries leave one effect row
        /// and all get the first one's output.
        #[tokio::test]
        async fn tx_attr_effect_and_mark_commit_together() {
            let table = unique("idem_txa");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut outputs = Vec::new();
            for worker in 1..=3_i64 {
                let mut tx = pool.begin().await.unwrap();
                let out = tx_apply(&store, &mut tx, "m-1".into(), &effects, worker).await;
                tx.commit().await.unwrap();
                outputs.push(out.unwrap());
            }
            assert_eq!(
                outputs,
                [1, 1, 1],
                "the 2nd and 3rd deliveries must replay the 1st"
            );
            assert_eq!(effect_rows(&pool, &effects).await, [("m-1".to_owned(), 1)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// The caller rolls back after the handler returned Ok: the effect and the mark are gone
        /// together, and the key is free again (PostgreSQL, SQLite: at once, the claim was in the
        /// transaction; MySQL/MariaDB: when the lease lapses, within its ttl), so a redelivery
        /// runs and commits.
        #[tokio::test]
        async fn tx_attr_caller_rollback_after_ok_frees_the_key() {
            let table = unique("idem_txa_rb");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let first = tx_apply(&store, &mut tx, "m-2".into(), &effects, 1).await;
            assert_eq!(first.unwrap(), 1);
            tx.rollback().await.unwrap();
            let rolled_back = tokio::time::Instant::now();
            assert_eq!(effect_rows(&pool, &effects).await, []);
            // tx_apply's ttl is 1 s; the margin is for the database's round trips.
            let deadline = rolled_back + Duration::from_secs(2);
            let mut refused = 0;
            let ran = loop {
                let mut tx = pool.begin().await.unwrap();
                match tx_apply(&store, &mut tx, "m-2".into(), &effects, 2).await {
                    Ok(worker) => {
                        tx.commit().await.unwrap();
                        break worker;
                    }
                    Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
                        tx.rollback().await.unwrap();
                        assert!(
                            !claims_in_tx(),
                            "{}: the rollback did not free the key at once",
                            db_name()
                        );
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the key was still in flight 2 s after the rollback (ttl 1 s)"
                        );
                        refused += 1;
                        // Waiting for the lease to lapse: time itself, nothing signals it.
                        tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            };
            eprintln!(
                "{}: the redelivery ran {:?} after the rollback ({refused} refused before)",
                db_name(),
                rolled_back.elapsed()
            );
            assert_eq!(
                ran, 2,
                "the redelivery must run, not replay the rolled-back output"
            );
            assert_eq!(effect_rows(&pool, &effects).await, [("m-2".to_owned(), 2)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// A holder held past its `max_lease` and ttl. MySQL/MariaDB: its lease lapses and a
        /// duplicate takes the key over and commits; the late holder gets `LeaseLost`, its
        /// transaction is rolled back under it, and even its caller's `commit` then commits
        /// nothing: one effect row, the duplicate's. PostgreSQL, SQLite: the claim is the open
        /// transaction itself, so there is no takeover however long it stays open (PostgreSQL:
        /// the duplicate is refused at once; SQLite: it cannot get the write lock), and the holder
        /// commits.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tx_attr_stale_holder_can_never_commit() {
            let table = unique("idem_txa_stale");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let (release, release_rx) = tokio::sync::oneshot::channel();
            let holder = {
                let (store, pool, effects) = (store.clone(), pool.clone(), effects.clone());
                let hold = Hold {
                    started: started_tx,
                    release: release_rx,
                };
                tokio::spawn(async move {
                    let mut tx = pool.begin().await.unwrap();
                    // The caller's own write, before the handler: idem must never undo it.
                    sqlx::query(AssertSqlSafe(insert_effect(&effects)))
                        .bind("caller-own")
                        .bind(0_i64)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let out =
                        tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 1, Some(hold)).await;
                    (out, tx)
                })
            };
            let lease = started.await.expect("the holder's handler started");

            if claims_in_tx() {
                // Past max_lease (1 s) and a ttl (300 ms) beyond it: a lease would have lapsed
                // by now. Nothing signals that (no lease is renewed here): time itself.
                tokio::time::sleep(Duration::from_millis(1000 + 300 + 300)).await;
                assert!(!lease.is_lost(), "the transaction's claim cannot be lost");
                // A duplicate on a connection of its own; SQLite's waits 100 ms for the lock.
                let mut conn = pool.acquire().await.unwrap().detach();
                if db_name() == "SQLite" {
                    sqlx::raw_sql("PRAGMA busy_timeout = 100")
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
                let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
                let dup = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 2, None).await;
                if db_name() == "SQLite" {
                    assert!(
                        matches!(
                            dup,
                            Err(AppError::Idem(Error::Unavailable {
                                phase: ::idem_runtime::Phase::Begin,
                                ..
                            }))
                        ),
                        "the duplicate got past the holder's write lock: {dup:?}"
                    );
                } else {
                    assert!(
                        matches!(dup, Err(AppError::Idem(Error::InFlight { .. }))),
                        "the duplicate was not refused while the holder's transaction is open: \
                         {dup:?}"
                    );
                }
                tx.rollback().await.unwrap();
                drop(conn);
                release.send(()).unwrap();
                let (out, tx) = holder.await.unwrap();
                assert_eq!(out.unwrap(), 1, "the holder lost a claim it cannot lose");
                tx.commit().await.unwrap();
                // After the holder's commit a duplicate replays its output.
                let mut tx = pool.begin().await.unwrap();
                let again = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 3, None).await;
                tx.commit().await.unwrap();
                assert_eq!(again.unwrap(), 1);
                assert_eq!(
                    effect_rows(&pool, &effects).await,
                    [("caller-own".to_owned(), 0), ("m-3".to_owned(), 1)]
                );
            } else {
                // The watchdog stops renewing at max_lease and says so; the lease lapses a ttl
                // later, and the duplicate takes the key over as soon as it has.
                lease.lost().await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                let mut tx = pool.begin().await.unwrap();
                let took_over = loop {
                    match tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 2, None).await {
                        Err(AppError::Idem(Error::InFlight { retry_after, .. })) => {
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "the lapsed lease was never taken over"
                            );
                            // Waiting for the lease to lapse: time itself.
                            tokio::time::sleep(retry_after.min(Duration::from_millis(20))).await;
                        }
                        other => break other,
                    }
                };
                assert_eq!(took_over.unwrap(), 2, "the duplicate must run, not replay");
                tx.commit().await.unwrap();
                release.send(()).unwrap();
                let (out, tx) = holder.await.unwrap();
                assert!(
                    matches!(out, Err(AppError::Idem(Error::LeaseLost { .. }))),
                    "the stale holder's mark was not refused: {out:?}"
                );
                // idem rolled the handler's writes back to its savepoint: the caller commits
                // anyway, and only its own earlier write is kept, not the stale effect.
                tx.commit().await.unwrap();
                let mut rows = effect_rows(&pool, &effects).await;
                rows.sort();
                assert_eq!(
                    rows,
                    [("caller-own".to_owned(), 0), ("m-3".to_owned(), 2)],
                    "the stale holder's effect was committed, or the caller's own write lost"
                );
                // And the key is B's: a duplicate replays B's output.
                let mut tx = pool.begin().await.unwrap();
                let again = tx_apply_held(&store, &mut tx, "m-3".into(), &effects, 3, None).await;
                tx.commit().await.unwrap();
                assert_eq!(again.unwrap(), 2);
            }
            drop_tables(&pool, &table, &effects).await;
        }

        /// A handler that runs for three ttls, at each isolation level (and SQLite's BEGIN
        /// kinds), with the callers reading before they call: a duplicate arriving two ttls in
        /// does not run (it is refused, or waits for the holder and replays, or waits and fails
        /// as the database requires; see `sql_common::tx_modes`), the holder commits, and a
        /// later delivery replays. One effect row per mode, the holder's.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn tx_attr_isolation_levels_and_long_handlers() {
            use $crate::sql_common::Dup;
            let table = unique("idem_txa_iso");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let modes = $crate::sql_common::tx_modes(db_name());
            for mode in modes {
                let key = format!("m-4-{}", mode.name);
                let (halfway_tx, halfway) = tokio::sync::oneshot::channel();
                let (answered, answered_rx) = tokio::sync::oneshot::channel();
                // A duplicate that is answered while the holder runs: the holder waits for that
                // answer before its last ttl, so the answer is sure to come while it is open.
                let answered_at_once = matches!(mode.dup, Dup::InFlight | Dup::Busy);
                let script = Long {
                    halfway: halfway_tx,
                    dup_answered: answered_at_once.then_some(answered_rx),
                };
                let call = |worker: i64, script: Option<Long>| {
                    let (store, pool, effects, key) =
                        (store.clone(), pool.clone(), effects.clone(), key.clone());
                    tokio::spawn(async move {
                        let mut conn = pool.acquire().await.unwrap();
                        let mut tx = begin_mode(&mut conn, mode, &effects).await;
                        let out =
                            tx_apply_long(&store, &mut tx, key, &effects, worker, script).await;
                        let ending = tokio::time::Instant::now();
                        if out.is_ok() {
                            tx.commit().await.unwrap();
                        } else {
                            tx.rollback().await.unwrap();
                        }
                        (out, ending)
                    })
                };
                let started = tokio::time::Instant::now();
                let holder = call(1, Some(script));
                halfway.await.expect("the holder's handler is two ttls in");
                let dup = call(2, None);
                let (dup_out, dup) = if answered_at_once {
                    // At once: not after a lock wait (SQLite's busy_timeout is 30 s, InnoDB's
                    // lock wait 50 s), while the holder waits for this answer.
                    let answer = tokio::time::timeout(Duration::from_secs(1), dup).await;
                    let Ok(joined) = answer else {
                        panic!("{}: the duplicate was not answered at once", mode.name)
                    };
                    let (out, _) = joined.unwrap();
                    answered.send(()).unwrap();
                    (Some(out), None)
                } else {
                    (None, Some(dup))
                };
                let (out, holder_commits) = holder.await.unwrap();
                assert_eq!(out.unwrap(), 1, "{}: the holder failed", mode.name);
                assert!(started.elapsed() >= 3 * LONG_TTL);
                match (mode.dup, dup_out) {
                    (Dup::InFlight, Some(out)) => assert!(
                        matches!(out, Err(AppError::Idem(Error::InFlight { .. }))),
                        "{}: the duplicate was not refused: {out:?}",
                        mode.name
                    ),
                    (Dup::Busy, Some(out)) => assert!(
                        matches!(
                            out,
                            Err(AppError::Idem(Error::Unavailable {
                                phase: ::idem_runtime::Phase::Begin,
                                ..
                            }))
                        ),
                        "{}: the duplicate's claim was not refused by the database: {out:?}",
                        mode.name
                    ),
                    (Dup::WaitsThenReplays, None) => {
                        let (out, answered_at) = dup.unwrap().await.unwrap();
                        assert_eq!(
                            out.unwrap(),
                            1,
                            "{}: the duplicate did not replay the holder's output",
                            mode.name
                        );
                        // It could only see the mark once the holder began committing.
                        assert!(answered_at > holder_commits, "{}", mode.name);
                    }
                    _ => unreachable!(),
                }
                // A later delivery, begun the same way, replays.
                let (out, _) = call(3, None).await.unwrap();
                assert_eq!(
                    out.unwrap(),
                    1,
                    "{}: the redelivery did not replay",
                    mode.name
                );
            }
            let expected: Vec<(String, i64)> = modes
                .iter()
                .map(|m| (format!("m-4-{}", m.name), 1))
                .collect();
            assert_eq!(effect_rows(&pool, &effects).await, expected);
            drop_tables(&pool, &table, &effects).await;
        }
    };
}
