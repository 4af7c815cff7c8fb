//! Findings of the review of issue 16's fixes (0fa4ff3..779f359), on one database each (stamped
//! out by `sql_store_tests!` beside the rest): each test is named after what breaks, and fails
//! on 779f359.

/// The findings of the review of the second review's fixes on one database. Expanded by `sql_store_tests!`, in the same module as
/// its helpers (after `sql_regression_tests!`, whose `small_pool` it uses).
#[macro_export]
macro_rules! sql_review_tx_tests {
    ($db:ty, $connect:ident) => {
        /// One acquire through a test's gate: 2 lets this one pass and arms the next, which
        /// gets 1 (the one the test acts on); 0 lets everything pass. Returns the step taken.
        fn gate_step(gate: &AtomicU32) -> u32 {
            gate.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |g| Some(g.saturating_sub(1)))
                .unwrap_or(0)
        }

        /// Finding (MySQL/MariaDB): `run_with_tx` takes a transaction the caller began on the
        /// store's pool, then claims the key through `claim_outside`, which is the store's plain
        /// `begin`: a second connection of that very pool. On a one-connection pool every call
        /// fails with `Unavailable { phase: Begin }` after the acquire timeout (four consumers on
        /// a four-connection pool: all of them), the class of issue 16's second finding, fixed
        /// for the attribute but not for `run_with_tx`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn run_with_tx_never_waits_for_a_second_connection_of_the_callers_pool() {
            let table = unique("idem_rwt1");
            let Some(pool) = small_pool(1).await else {
                return;
            };
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            let effects = business_table(&pool).await;
            let opts = Options::with_scope(unique("rwt"));
            for delivery in 0..2_i64 {
                let insert = insert_effect(&effects);
                // The caller begins its own transaction (e.g. at its own isolation level), as
                // `run_with_tx`'s docs say.
                let tx = pool.begin().await.unwrap();
                let started = std::time::Instant::now();
                let out: Result<i64, AppError> = store
                    .run_with_tx(tx, &opts, Call::new("m-1"), move |tx| {
                        Box::pin(async move {
                            sqlx::query(AssertSqlSafe(insert))
                                .bind("m-1")
                                .bind(delivery)
                                .execute(&mut **tx)
                                .await?;
                            Ok(delivery)
                        })
                    })
                    .await;
                assert!(
                    matches!(out, Ok(0)),
                    "delivery {delivery} on a one-connection pool, after {:?}: {out:?}",
                    started.elapsed()
                );
            }
            assert_eq!(effect_rows(&pool, &effects).await, [("m-1".to_owned(), 0)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// A nested handler whose transaction ends under it (on MySQL/MariaDB a deadlock rolls
        /// the whole transaction back; here, as in the repo's own test, a raw `ROLLBACK`): idem
        /// answers `TransactionAborted` for it.
        #[::idem_runtime::idempotent(
            key = "order",
            tx = "tx",
            store = "store",
            scope = "tests.review16.inner_aborts",
            ttl = "1s"
        )]
        async fn inner_whose_transaction_ends(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            order: String,
            effects: &str,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(format!("points:{order}"))
                .bind(2_i64)
                .execute(&mut **tx)
                .await?;
            sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await?;
            Err(AppError::OnPurpose)
        }

        /// An outer handler for which the nested call is optional (points are a bonus): it logs
        /// the nested call's error and goes on.
        #[::idem_runtime::idempotent(
            key = "order",
            tx = "tx",
            store = "store",
            scope = "tests.review16.outer_goes_on",
            ttl = "1s"
        )]
        async fn outer_that_tolerates_its_nested_call(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            order: String,
            effects: &str,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(format!("coupon:{order}"))
                .bind(1_i64)
                .execute(&mut **tx)
                .await?;
            let points = inner_whose_transaction_ends(store, &mut *tx, order.clone(), effects).await;
            assert!(
                matches!(points, Err(AppError::Idem(Error::TransactionAborted { .. }))),
                "{points:?}"
            );
            Ok(1)
        }

        /// Finding: once a nested call answered `TransactionAborted` (the transaction is gone:
        /// idem's `abort_in` sent a raw `ROLLBACK`, and sqlx still counts the transaction as
        /// open, so every later statement on it autocommits), the enclosing transactional call
        /// still writes its done mark on that connection, outside any transaction, and answers
        /// `Ok`. The mark is committed at once; the outer handler's effect (written before the
        /// nested call) was rolled back with the transaction. The caller is told `Ok`, the
        /// redelivery replays `Ok`, and the coupon is never issued: an effect lost behind a done
        /// mark. The outer call must refuse to mark (and answer `TransactionAborted` too) once
        /// a call nested in it aborted the transaction, or check that the connection is still in
        /// a transaction before it marks.
        #[tokio::test]
        async fn an_outer_call_never_marks_done_after_its_transaction_was_aborted_under_it() {
            let table = unique("idem_outerabort");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let out =
                outer_that_tolerates_its_nested_call(&store, &mut tx, "o-1".into(), &effects).await;
            // Whatever the caller does next (here: it rolls back, as told to for an error; it
            // was told Ok, so it might as well commit), the coupon and its mark must go together.
            let _ = tx.rollback().await;
            let coupons = effect_rows(&pool, &effects).await;
            let mut tx = pool.begin().await.unwrap();
            let again =
                outer_that_tolerates_its_nested_call(&store, &mut tx, "o-1".into(), &effects).await;
            let _ = tx.rollback().await;
            let replayed_without_effect = matches!(again, Ok(1)) && coupons.is_empty();
            drop_tables(&pool, &table, &effects).await;
            assert!(
                !replayed_without_effect,
                "the outer call answered {out:?}; its coupon rows after the caller's rollback: \
                 {coupons:?}; the redelivery answered {again:?} without running: the done mark \
                 was committed outside the transaction, the effect was not"
            );
        }

        /// Finding (MySQL/MariaDB): after `TransactionAborted` the transaction is gone on the
        /// server (a deadlock rolls it back whole on MySQL/MariaDB; here the repo's own trigger,
        /// a handler that ends it), but sqlx still counts it as open, and idem checks only
        /// sqlx's count. A batch that goes on with its next message on the same `tx` (and never
        /// commits, as `TransactionAborted` says) runs the next handler in autocommit: idem's
        /// `SAVEPOINT` is accepted outside a transaction, the handler's write commits at once,
        /// and when the handler fails, idem's rollback to the savepoint fails ("SAVEPOINT does
        /// not exist"), so it answers `TransactionAborted` ("nothing of the handler's is kept,
        /// the key is free") and releases the key while the write stays committed: the
        /// redelivery runs the handler again, a double effect although nobody committed. A call
        /// must refuse a connection that is not in a transaction on the server (MariaDB
        /// `@@in_transaction`), or `abort_in` must leave the connection unusable rather than
        /// in autocommit.
        #[tokio::test]
        async fn a_call_on_a_transaction_that_is_gone_never_commits_its_handlers_writes() {
            let table = unique("idem_gone");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let first = breaks_the_transaction(&store, &mut tx, "k-1".into(), &effects).await;
            assert!(
                matches!(first, Err(AppError::Idem(Error::TransactionAborted { .. }))),
                "{first:?}"
            );
            // The batch goes on with its next message on the same transaction, then rolls it
            // all back (it never commits).
            let second = breaks_nothing_but_fails(&store, &mut tx, "k-2".into(), &effects).await;
            let _ = tx.rollback().await;
            // The redelivery of the second message (the key was released).
            let mut tx = pool.begin().await.unwrap();
            let again = tx_apply(&store, &mut tx, "k-2".into(), &effects, 2).await;
            tx.commit().await.unwrap();
            let rows = effect_rows(&pool, &effects).await;
            drop_tables(&pool, &table, &effects).await;
            assert_eq!(
                rows,
                [("k-2".to_owned(), 2)],
                "the second call answered {second:?}, its failed handler's write was committed \
                 although the caller never committed, and the redelivery ({again:?}) ran again"
            );
        }

        /// Finding (MySQL/MariaDB, `run_in_tx` and `LayeredStore::run_in_tx`): `run_owned` claims
        /// the key outside the transaction first (`claim_outside`), then awaits `pool.begin()`,
        /// and only inside `execute_tx` is the claim given a guard (the `Finish` that releases
        /// it when the call is dropped) and renewals. A call cancelled while it waits for its
        /// transaction (a request timeout while the pool is busy: here the pool's
        /// `before_acquire` hook stands for the wait) leaves the claim held by no one for its
        /// whole `ttl`: the redelivery is refused in flight (60 s by default) while nothing runs,
        /// the class of issue 16's seventh finding, at another await.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn run_in_tx_cancelled_while_it_begins_its_transaction_leaves_no_claim_behind() {
            if claims_in_tx() {
                return; // PostgreSQL, SQLite: nothing is claimed before the transaction begins
            }
            let table = unique("idem_rbc");
            let Some(base) = $connect().await else {
                return;
            };
            // 0: every acquire passes; 2: the next acquire passes, the one after waits 3 s.
            let gate = Arc::new(AtomicU32::new(0));
            let hook = gate.clone();
            let on_connect = gate.clone();
            // An acquire goes through `before_acquire` if it takes an idle connection and
            // through `after_connect` if it opens one: the gate is in both.
            let pool = sqlx::pool::PoolOptions::<$db>::new()
                .max_connections(4)
                .before_acquire(move |_conn, _meta| {
                    let hook = hook.clone();
                    Box::pin(async move {
                        if gate_step(&hook) == 1 {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        Ok(true)
                    })
                })
                .after_connect(move |_conn, _meta| {
                    let hook = on_connect.clone();
                    Box::pin(async move {
                        if gate_step(&hook) == 1 {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        Ok(())
                    })
                })
                .connect_with((*base.connect_options()).clone())
                .await
                .unwrap();
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            let effects = business_table(&pool).await;
            let opts = Options::with_scope(unique("rbc"));
            let insert = insert_effect(&effects);
            let deliver = |worker: i64| {
                let insert = insert.clone();
                store.run_in_tx(&opts, Call::new("m-1"), move |tx| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(insert))
                            .bind("m-1")
                            .bind(worker)
                            .execute(&mut **tx)
                            .await?;
                        Ok::<i64, AppError>(worker)
                    })
                })
            };
            // The claim's acquire passes, the transaction's waits.
            gate.store(2, Ordering::SeqCst);
            let cancelled = tokio::time::timeout(Duration::from_millis(1500), deliver(1)).await;
            assert!(cancelled.is_err(), "the first delivery was not cancelled: {cancelled:?}");
            // Whatever the call left to finish in the background has had its time.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let again = deliver(2).await;
            let rows = effect_rows(&pool, &effects).await;
            drop_tables(&pool, &table, &effects).await;
            assert!(
                matches!(again, Ok(2)),
                "the redelivery after a cancelled call that never ran its handler: {again:?}"
            );
            assert_eq!(rows, [("m-1".to_owned(), 2)]);
        }

        /// Finding (MySQL/MariaDB, `run_in_tx`, `run_with_tx` and `LayeredStore::run_in_tx`):
        /// the releases in `run_owned` (after `pool.begin()` failed, and after the commit
        /// failed) are tried once, `let _ = store.release(..)`: the class of issue 16's eighth
        /// finding, which the change fixed in `execute`, `execute_tx` and the layered front but
        /// not here. A database that drops its clients between the claim and the transaction's
        /// `BEGIN` (a failover; here the pool's hooks stand for it, for every pool of the store)
        /// fails the `BEGIN`, then the release, and the claim made outside the transaction is
        /// held by no one for its whole `ttl` although the database is back a second later.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn run_in_tx_whose_transaction_cannot_begin_frees_the_key_once_the_database_is_back() {
            if claims_in_tx() {
                return; // PostgreSQL, SQLite: nothing is claimed before the transaction begins
            }
            let table = unique("idem_rbf");
            let Some(base) = $connect().await else {
                return;
            };
            // The database as this store's pools see it: down while `down` is set.
            let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            // 2: the next acquire passes, and the one after takes the database down.
            let gate = Arc::new(AtomicU32::new(0));
            let (on_acquire, on_connect) = ((gate.clone(), down.clone()), (gate.clone(), down.clone()));
            let pool = sqlx::pool::PoolOptions::<$db>::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(2))
                // An acquire goes through `before_acquire` if it takes an idle connection and
                // through `after_connect` if it opens one: the gate is in both.
                .before_acquire(move |_conn, _meta| {
                    let (gate, down) = on_acquire.clone();
                    Box::pin(async move {
                        if gate_step(&gate) == 1 {
                            down.store(true, Ordering::SeqCst);
                        }
                        if down.load(Ordering::SeqCst) {
                            return Err(sqlx::Error::Protocol("the server dropped its clients".into()));
                        }
                        Ok(true)
                    })
                })
                .after_connect(move |_conn, _meta| {
                    let (gate, down) = on_connect.clone();
                    Box::pin(async move {
                        if gate_step(&gate) == 1 {
                            down.store(true, Ordering::SeqCst);
                        }
                        if down.load(Ordering::SeqCst) {
                            return Err(sqlx::Error::Protocol("the server is restarting".into()));
                        }
                        Ok(())
                    })
                })
                .connect_with((*base.connect_options()).clone())
                .await
                .unwrap();
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            let effects = business_table(&pool).await;
            let opts = Options::with_scope(unique("rbf"));
            let insert = insert_effect(&effects);
            let deliver = |worker: i64| {
                let insert = insert.clone();
                store.run_in_tx(&opts, Call::new("m-1"), move |tx| {
                    Box::pin(async move {
                        sqlx::query(AssertSqlSafe(insert))
                            .bind("m-1")
                            .bind(worker)
                            .execute(&mut **tx)
                            .await?;
                        Ok::<i64, AppError>(worker)
                    })
                })
            };
            gate.store(2, Ordering::SeqCst);
            let started = std::time::Instant::now();
            let first = deliver(1).await;
            assert!(
                matches!(first, Err(AppError::Idem(Error::Unavailable { phase: ::idem_runtime::Phase::Begin, .. }))),
                "{first:?}"
            );
            eprintln!("the first delivery failed after {:?}: {first:?}", started.elapsed());
            // The database is back a second later.
            tokio::time::sleep(Duration::from_secs(1)).await;
            down.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let again = deliver(2).await;
            let rows = effect_rows(&pool, &effects).await;
            drop_tables(&pool, &table, &effects).await;
            assert!(
                matches!(again, Ok(2)),
                "the redelivery, 3 s after the database came back, of a call whose handler never ran: {again:?}"
            );
            assert_eq!(rows, [("m-1".to_owned(), 2)]);
        }

        /// Finding (PostgreSQL, low): the transactional claim's advisory lock is keyed by the
        /// table's name *as given* (`advisory_key(&table.qualified, ..)`), not by the table. Two
        /// stores on one table, one named `idem_x` and the other `public.idem_x` (two services,
        /// or a search path), take different locks for one key: a duplicate is not answered in
        /// flight at once, as the README promises, but waits on the holder's uncommitted row for
        /// the holder's whole transaction (safe, but a consumer stalled for as long as the
        /// longest handler, instead of a redelivery).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_duplicate_through_another_spelling_of_the_table_is_refused_at_once() {
            if db_name() != "PostgreSQL" {
                return;
            }
            let table = unique("sp");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let schema: String = sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&pool)
                .await
                .unwrap();
            let other = SqlStore::with_table(pool.clone(), &format!("{schema}.{table}")).unwrap();
            let effects = business_table(&pool).await;
            // The holder, through the first store, keeps its transaction open.
            let mut held = pool.begin().await.unwrap();
            assert_eq!(
                tx_apply(&store, &mut held, "m-1".into(), &effects, 1).await.unwrap(),
                1
            );
            // The duplicate, through the second.
            let mut tx = pool.begin().await.unwrap();
            let dup = tokio::time::timeout(
                Duration::from_secs(3),
                tx_apply(&other, &mut tx, "m-1".into(), &effects, 2),
            )
            .await;
            held.rollback().await.unwrap();
            let _ = tx.rollback().await;
            drop_tables(&pool, &table, &effects).await;
            assert!(
                matches!(dup, Ok(Err(AppError::Idem(Error::InFlight { .. })))),
                "a duplicate while the holder's transaction was open: {dup:?} (Err(Elapsed): it \
                 waited for the holder's transaction)"
            );
        }
    };
}
