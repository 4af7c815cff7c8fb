//! Regression tests of the second outside review, on one database each (stamped out by
//! `sql_store_tests!` beside the rest): each is named after what broke.

/// The second review's regressions on one database. Expanded by `sql_store_tests!`, in the same
/// module as its helpers (and after `sql_tx_attr_tests!`, whose `effect_rows`, `drop_tables`
/// and `db_name` it uses).
#[macro_export]
macro_rules! sql_regression_tests {
    ($db:ty, $connect:ident) => {
        /// A pool on the same database as `$connect`'s, with at most `max` connections and a short
        /// acquire timeout, so that a call waiting for a connection its caller holds fails fast.
        async fn small_pool(max: u32) -> Option<sqlx::Pool<$db>> {
            let pool = $connect().await?;
            let small = sqlx::pool::PoolOptions::<$db>::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(3))
                .connect_with((*pool.connect_options()).clone())
                .await
                .unwrap();
            Some(small)
        }

        #[::idem_runtime::idempotent(
            key = "order",
            tx = "tx",
            store = "store",
            scope = "tests.review.award_points",
            ttl = "1s"
        )]
        async fn award_points(
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
            Ok(2)
        }

        /// An idempotent handler that calls another one with the same transaction, then fails
        /// when `fail` says so.
        #[::idem_runtime::idempotent(
            key = "order",
            tx = "tx",
            store = "store",
            scope = "tests.review.issue_coupon",
            ttl = "1s"
        )]
        async fn issue_coupon(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            order: String,
            effects: &str,
            fail: bool,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(format!("coupon:{order}"))
                .bind(1_i64)
                .execute(&mut **tx)
                .await?;
            award_points(store, &mut *tx, order.clone(), effects).await?;
            if fail {
                return Err(AppError::OnPurpose);
            }
            Ok(1)
        }

        /// Review finding (MariaDB): nested transactional handlers took savepoints of one name,
        /// which MariaDB replaces, so the inner call's release removed the outer one; the outer
        /// handler's `Err` could not roll back, its coupon stayed in the transaction while its
        /// key was released, and a caller that committed after the error kept it: the
        /// redelivery issued a second coupon. Now every call's savepoint has a name of its own.
        #[tokio::test]
        async fn nested_tx_handlers_keep_their_own_savepoints() {
            let table = unique("idem_nest");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let failed = issue_coupon(&store, &mut tx, "o-1".into(), &effects, true).await;
            assert!(matches!(failed, Err(AppError::OnPurpose)), "{failed:?}");
            // The caller goes on, as the README allows after an error, and commits.
            tx.commit().await.unwrap();
            assert_eq!(
                effect_rows(&pool, &effects).await,
                [],
                "the failed handler's writes (its own and its nested call's) were committed"
            );
            // The redelivery runs both, once, at once (the nested call's key was freed too).
            let mut tx = pool.begin().await.unwrap();
            let ok = issue_coupon(&store, &mut tx, "o-1".into(), &effects, false).await;
            assert_eq!(ok.unwrap(), 1);
            tx.commit().await.unwrap();
            let mut rows = effect_rows(&pool, &effects).await;
            rows.sort();
            assert_eq!(
                rows,
                [("coupon:o-1".to_owned(), 1), ("points:o-1".to_owned(), 2)]
            );
            // And a duplicate replays.
            let mut tx = pool.begin().await.unwrap();
            assert_eq!(
                issue_coupon(&store, &mut tx, "o-1".into(), &effects, false)
                    .await
                    .unwrap(),
                1
            );
            tx.commit().await.unwrap();
            assert_eq!(effect_rows(&pool, &effects).await.len(), 2);
            drop_tables(&pool, &table, &effects).await;
        }

        /// A handler that ends the transaction under idem's feet (a raw `ROLLBACK`), then fails:
        /// idem cannot roll back to its savepoint.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.review.breaks_tx",
            ttl = "1s"
        )]
        async fn breaks_the_transaction(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(1_i64)
                .execute(&mut **tx)
                .await?;
            sqlx::raw_sql("ROLLBACK").execute(&mut **tx).await?;
            Err(AppError::OnPurpose)
        }

        /// Review finding: a failed rollback to idem's savepoint was only logged ("the
        /// transaction is gone") although the transaction could still be open with the handler's
        /// writes in it. The call's error must say that the transaction cannot be committed.
        #[tokio::test]
        async fn a_savepoint_that_cannot_be_rolled_back_to_says_the_transaction_is_aborted() {
            let table = unique("idem_abort");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let out = breaks_the_transaction(&store, &mut tx, "k-1".into(), &effects).await;
            assert!(
                matches!(out, Err(AppError::Idem(Error::TransactionAborted { .. }))),
                "{out:?}"
            );
            let _ = tx.commit().await;
            assert_eq!(effect_rows(&pool, &effects).await, []);
            drop_tables(&pool, &table, &effects).await;
        }

        /// Review finding (MySQL/MariaDB): the transactional attribute claimed (and released after
        /// an `Err`) through a second connection of the pool whose connection the caller's
        /// transaction holds: on a one-connection pool every call failed with
        /// `Unavailable { phase: Begin }` after the acquire timeout, and four consumers on a
        /// four-connection pool all failed, on every redelivery.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn tx_attr_never_waits_for_a_second_connection_of_the_callers_pool() {
            let table = unique("idem_1conn");
            let Some(pool) = small_pool(1).await else {
                return;
            };
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            let effects = business_table(&pool).await;
            // A first delivery, a duplicate, a failure and its redelivery.
            for (worker, fail) in [(1, false), (2, false), (3, true), (4, false)] {
                let key = if fail || worker == 4 { "m-2" } else { "m-1" };
                let mut tx = pool.begin().await.unwrap();
                let out = if fail {
                    breaks_nothing_but_fails(&store, &mut tx, key.into(), &effects).await
                } else {
                    tx_apply(&store, &mut tx, key.into(), &effects, worker).await
                };
                match (fail, out) {
                    (false, Ok(_)) => tx.commit().await.unwrap(),
                    (true, Err(AppError::OnPurpose)) => tx.rollback().await.unwrap(),
                    (_, other) => panic!("delivery {worker} on a one-connection pool: {other:?}"),
                }
            }
            assert_eq!(
                effect_rows(&pool, &effects).await,
                [("m-1".to_owned(), 1), ("m-2".to_owned(), 4)]
            );
            drop_tables(&pool, &table, &effects).await;

            // Four consumers on a four-connection pool, each holding one for its transaction.
            let table = unique("idem_4conn");
            let Some(pool) = small_pool(4).await else {
                return;
            };
            let store = SqlStore::with_table(pool.clone(), &table).unwrap();
            store.migrate().await.unwrap();
            let effects = business_table(&pool).await;
            let barrier = Arc::new(tokio::sync::Barrier::new(4));
            let consumers: Vec<_> = (0..4_i64)
                .map(|worker| {
                    let (store, pool, effects, barrier) =
                        (store.clone(), pool.clone(), effects.clone(), barrier.clone());
                    tokio::spawn(async move {
                        let mut tx = pool.begin().await.unwrap();
                        barrier.wait().await;
                        let out =
                            tx_apply(&store, &mut tx, format!("c-{worker}"), &effects, worker)
                                .await;
                        tx.commit().await.unwrap();
                        out
                    })
                })
                .collect();
            for c in consumers {
                c.await.unwrap().unwrap();
            }
            assert_eq!(effect_rows(&pool, &effects).await.len(), 4);
            drop_tables(&pool, &table, &effects).await;
        }

        /// A handler that writes, then fails.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.tx_attr",
            ttl = "1s"
        )]
        async fn breaks_nothing_but_fails(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
        ) -> Result<i64, AppError> {
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(-1_i64)
                .execute(&mut **tx)
                .await?;
            Err(AppError::OnPurpose)
        }

        /// Review finding: after the transactional attribute returned `Err`, the key stayed held
        /// until the caller's transaction ended (PostgreSQL's advisory lock is transaction-
        /// scoped), so an immediate redelivery (while the caller had not yet rolled back, or had
        /// dropped the transaction and sqlx had not sent its `ROLLBACK`) got `InFlight`. The
        /// claim is now made after a savepoint and undone with the handler's writes. (SQLite:
        /// the open transaction keeps the database's write lock; the redelivery waits for it.)
        #[tokio::test]
        async fn an_error_frees_the_key_while_the_caller_still_holds_its_transaction() {
            if db_name() == "SQLite" {
                return;
            }
            let table = unique("idem_errfree");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let effects = business_table(&pool).await;
            let mut held = pool.begin().await.unwrap();
            let failed = breaks_nothing_but_fails(&store, &mut held, "e-1".into(), &effects).await;
            assert!(matches!(failed, Err(AppError::OnPurpose)), "{failed:?}");
            // The caller still holds its transaction: a redelivery on another connection runs.
            let mut tx = pool.begin().await.unwrap();
            let again = tx_apply(&store, &mut tx, "e-1".into(), &effects, 2).await;
            assert_eq!(
                again.unwrap(),
                2,
                "the redelivery was refused while the failed call's transaction was open"
            );
            tx.commit().await.unwrap();
            held.rollback().await.unwrap();
            assert_eq!(effect_rows(&pool, &effects).await, [("e-1".to_owned(), 2)]);
            drop_tables(&pool, &table, &effects).await;
        }

        /// Review finding (PostgreSQL, and MySQL/MariaDB where a statement's clock is read when it
        /// starts): a claim that waited on a row lock (an expired row held by a purge) got a
        /// lease measured from before the wait, already over when granted, and a second claim
        /// right after it was granted too: two holders at once.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_claim_that_waited_on_a_row_lock_gets_a_whole_lease() {
            if db_name() == "SQLite" {
                return; // one writer at a time: a claim never waits inside its statement
            }
            let table = unique("idem_lockwait");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let ttl = Duration::from_secs(1);
            for (round, lock) in ["SELECT 1 FROM {t} WHERE idem_key = {p} FOR UPDATE", "DELETE FROM {t} WHERE idem_key = {p}"]
                .into_iter()
                .enumerate()
            {
                if lock.starts_with("DELETE") && db_name() != "PostgreSQL" {
                    continue; // MySQL reads first: a deleted row is found absent and claimed anew
                }
                let k = Key::new(&format!("k-{round}")).unwrap();
                // An expired lease: its row stays until it is purged.
                let Begin::Acquired(_) = store
                    .begin(&req("lockwait", &k, Duration::from_millis(100)))
                    .await
                    .unwrap()
                else {
                    panic!()
                };
                tokio::time::sleep(Duration::from_millis(300)).await;
                // Another transaction holds the row for twice the ttl.
                let mut locker = pool.begin().await.unwrap();
                sqlx::query(AssertSqlSafe(
                    lock.replace("{t}", &table).replace("{p}", &DIALECT.p(1)),
                ))
                .bind(k.as_str())
                .execute(&mut *locker)
                .await
                .unwrap();
                let first = {
                    let store = store.clone();
                    let k = k.clone();
                    tokio::spawn(async move { store.begin(&req("lockwait", &k, ttl)).await })
                };
                tokio::time::sleep(2 * ttl).await;
                locker.commit().await.unwrap();
                let first = first.await.unwrap().unwrap();
                assert!(matches!(first, Begin::Acquired(_)), "{first:?}");
                let second = store.begin(&req("lockwait", &k, ttl)).await.unwrap();
                assert!(
                    matches!(second, Begin::InFlight { .. }),
                    "round {round}: a second claim right after the first was answered {second:?}: two holders"
                );
            }
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// Review finding: a scope over 200 bytes is stored as `sha256:<hex>`, but a short scope
        /// that already read `sha256:<hex>` was stored as it is, so the two shared one key space
        /// and the short one replayed the long one's output (reachable with scopes computed at
        /// run time, per tenant). A scope with NUL was refused by PostgreSQL.
        #[tokio::test]
        async fn a_short_scope_spelling_a_hashed_long_scope_has_its_own_records() {
            let table = unique("idem_scopes");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let long = format!("tenant-{}", "x".repeat(300));
            let k = Key::new("order-1").unwrap();
            let long_req = req(&long, &k, Duration::from_secs(60));
            let Begin::Acquired(lease) = store.begin(&long_req).await.unwrap() else {
                panic!()
            };
            store
                .complete(&long, &k, &lease, b"long tenant's output", Duration::from_secs(60))
                .await
                .unwrap();
            // The column is text or binary, by database.
            let select = format!("SELECT scope FROM {table}");
            let stored = match sqlx::query_scalar::<_, Vec<u8>>(AssertSqlSafe(select.clone()))
                .fetch_one(&pool)
                .await
            {
                Ok(bytes) => bytes,
                Err(_) => sqlx::query_scalar::<_, String>(AssertSqlSafe(select))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .into_bytes(),
            };
            let stored = String::from_utf8(stored).unwrap();
            assert!(stored.starts_with("sha256:"), "{stored}");
            let spelled = store
                .begin(&req(&stored, &k, Duration::from_secs(60)))
                .await
                .unwrap();
            assert!(
                matches!(spelled, Begin::Acquired(_)),
                "a short scope spelling the long one's stored form got {spelled:?}"
            );
            let with_nul = store
                .begin(&req("tenant\0b", &k, Duration::from_secs(60)))
                .await;
            assert!(matches!(with_nul, Ok(Begin::Acquired(_))), "{with_nul:?}");
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }

        /// Review finding (SQLite, whose clock has millisecond precision): a claim, a release, a
        /// purge and a new claim within one millisecond handed out the same fence, and a row whose
        /// fence had run ahead of the clock (quick takeovers add one to the last fence) handed out
        /// a smaller one once purged. Fences must strictly increase: a purge keeps a row until the
        /// clock has passed its fence.
        #[tokio::test]
        async fn fences_never_go_back_across_release_and_purge() {
            let table = unique("idem_fencepurge");
            let Some(store) = fresh_store(&table).await else {
                return;
            };
            let pool = store.pool().clone();
            let mut last = 0;
            let k = Key::new("k").unwrap();
            for round in 0..100 {
                let Begin::Acquired(lease) = store
                    .begin(&req("fp", &k, Duration::from_secs(60)))
                    .await
                    .unwrap()
                else {
                    panic!()
                };
                assert!(
                    lease.fence > last,
                    "round {round}: fence {} after {last}",
                    lease.fence
                );
                last = lease.fence;
                store.release("fp", &k, &lease).await.unwrap();
                store.purge(100).await.unwrap();
            }
            // A key whose last fence is ten seconds ahead of the clock (as many quick takeovers
            // would leave it), released: a purge must not forget that fence.
            let k = Key::new("ahead").unwrap();
            let Begin::Acquired(lease) = store
                .begin(&req("fp", &k, Duration::from_secs(60)))
                .await
                .unwrap()
            else {
                panic!()
            };
            let ahead = lease.fence as i64 + 10_000_000;
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {table} SET fence = {} WHERE idem_key = {}",
                DIALECT.p(1),
                DIALECT.p(2)
            )))
            .bind(ahead)
            .bind("ahead")
            .execute(&pool)
            .await
            .unwrap();
            store.release("fp", &k, &lease).await.unwrap();
            store.purge(100).await.unwrap();
            let Begin::Acquired(next) = store
                .begin(&req("fp", &k, Duration::from_secs(60)))
                .await
                .unwrap()
            else {
                panic!()
            };
            assert!(
                next.fence as i64 > ahead,
                "the fence went back from {ahead} to {} across a purge",
                next.fence
            );
            exec(&pool, format!("DROP TABLE {table}")).await;
            exec(&pool, format!("DROP TABLE {table}_migrations")).await;
        }
    };
}
