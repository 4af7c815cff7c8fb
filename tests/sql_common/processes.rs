//! Several OS processes on one database: racing, and killed with SIGKILL (see `sql_store_tests!`,
//! which stamps this out beside the rest).

/// The multi-process tests on one database, and the entry point of their worker processes.
/// Expanded by `sql_store_tests!`, in the same module as its helpers.
#[macro_export]
macro_rules! sql_process_tests {
    ($db:ty, $connect:ident) => {
        // ---- Several OS processes ----

        const RACE_KEYS: usize = 30;
        const RACE_PROCESSES: usize = 4;

        /// Several processes run the same keys at the same time through `run` (not
        /// transactional): every key executes once in all, and every process gets that
        /// execution's output.
        #[test]
        fn processes_race_and_each_key_runs_once() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let Some(pool) = rt.block_on($connect()) else { return };
            let table = unique("idem_procs");
            let runs_table = unique("runs");
            rt.block_on(async {
                SqlStore::with_table(pool.clone(), &table).unwrap().migrate().await.unwrap();
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {runs_table} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                        pk = DIALECT.serial_pk,
                        text = DIALECT.text
                    ),
                )
                .await;
            });
            let scope = unique("procs");
            let children: Vec<_> = (0..RACE_PROCESSES)
                .map(|w| {
                    $crate::sql_common::spawn_worker(
                        "race",
                        &[table.clone(), runs_table.clone(), scope.clone(), w.to_string()],
                        true,
                    )
                })
                .collect();
            let mut outputs: Vec<Vec<String>> = Vec::new();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "a worker failed: {out:?}");
                let lines = $crate::sql_common::results(&out);
                assert_eq!(lines.len(), RACE_KEYS, "{lines:?}");
                outputs.push(lines);
            }
            for w in &outputs[1..] {
                assert_eq!(w, &outputs[0], "processes disagree on the outputs");
            }
            rt.block_on(async {
                assert_eq!(
                    count(&pool, format!("SELECT count(*) FROM {runs_table}")).await,
                    RACE_KEYS as i64,
                    "some key ran more than once"
                );
                exec(&pool, format!("DROP TABLE {runs_table}")).await;
                exec(&pool, format!("DROP TABLE {table}")).await;
                exec(&pool, format!("DROP TABLE {table}_migrations")).await;
            });
        }

        async fn race_worker(args: &[String]) {
            let (table, runs_table, scope, me) = (&args[0], &args[1], &args[2], &args[3]);
            let me: i64 = me.parse().unwrap();
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            let opts = Options::with_scope(scope.clone()).wait(Duration::from_secs(60));
            let insert = format!(
                "INSERT INTO {runs_table} (msg_key, worker) VALUES ({}, {})",
                DIALECT.p(1),
                DIALECT.p(2)
            );
            for i in 0..RACE_KEYS {
                let key = format!("k-{i}");
                let out: Result<String, AppError> = run(&store, &opts, Call::new(&key), || async {
                    // The execution is recorded outside any transaction: it counts runs.
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(&key)
                        .bind(me)
                        .execute(&pool)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    Ok(format!("{key} by {me}"))
                })
                .await;
                println!("IDEM-RESULT {}", out.unwrap());
            }
        }

        const KILL_KEYS: usize = 120;
        const KILL_COPIES: usize = 4;
        const KILL_WORKERS: usize = 4;

        /// The transactional mode under crashes: worker processes consume a stream with many
        /// duplicates and are killed with SIGKILL at random moments, then restarted, until every
        /// message is acknowledged. The business table ends with exactly one row per key.
        #[test]
        fn tx_workers_killed_at_random_apply_each_effect_once() {
            kill_workers_at_random("sigkill");
        }

        /// The same through the attribute, where the caller begins and commits the transaction:
        /// kills land before, inside and after the handler, between its return and the caller's
        /// commit, and between that commit and the acknowledgement.
        #[test]
        fn tx_attr_workers_killed_at_random_apply_each_effect_once() {
            kill_workers_at_random("sigkill_attr");
        }

        /// Run the SIGKILL test with workers of `role` ("sigkill": `run_in_tx`; "sigkill_attr":
        /// the attribute).
        fn kill_workers_at_random(role: &str) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let Some(pool) = rt.block_on($connect()) else { return };
            let mut rng = Rng::from_env_or_time();
            let table = unique("idem_kill");
            let effects = unique("effects");
            let attempts = unique("attempts");
            let queue = unique("queue");
            rt.block_on(async {
                SqlStore::with_table(pool.clone(), &table).unwrap().migrate().await.unwrap();
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {effects} (id {pk}, msg_key {text} NOT NULL, worker BIGINT NOT NULL)",
                        pk = DIALECT.serial_pk,
                        text = DIALECT.text
                    ),
                )
                .await;
                exec(
                    &pool,
                    format!(
                        "CREATE TABLE {queue} (seq BIGINT PRIMARY KEY, msg_key {text} NOT NULL, acked SMALLINT NOT NULL)",
                        text = DIALECT.text
                    ),
                )
                .await;
                // The stream: every key several times, shuffled (duplicates near and far apart).
                let mut stream: Vec<usize> = (0..KILL_KEYS * KILL_COPIES).map(|i| i % KILL_KEYS).collect();
                rng.shuffle(&mut stream);
                let insert = format!(
                    "INSERT INTO {queue} (seq, msg_key, acked) VALUES ({}, {}, 0)",
                    DIALECT.p(1),
                    DIALECT.p(2)
                );
                for (seq, k) in stream.iter().enumerate() {
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(seq as i64)
                        .bind(format!("msg-{k}"))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            });
            let scope = unique("kill");
            let args = |w: usize, seed: u64| {
                vec![
                    table.clone(),
                    effects.clone(),
                    attempts.clone(),
                    queue.clone(),
                    scope.clone(),
                    w.to_string(),
                    seed.to_string(),
                ]
            };
            let mut workers = $crate::sql_common::Workers(
                (0..KILL_WORKERS)
                    .map(|w| $crate::sql_common::spawn_worker(role, &args(w, rng.next()), false))
                    .collect(),
            );
            let started = std::time::Instant::now();
            let mut kills = 0;
            let unacked = |rt: &tokio::runtime::Runtime| {
                rt.block_on(count(&pool, format!("SELECT count(*) FROM {queue} WHERE acked = 0")))
            };
            loop {
                // Random moments: the schedule comes from the seed printed above.
                std::thread::sleep(Duration::from_millis(20 + rng.below(180)));
                let left = unacked(&rt);
                if left == 0 {
                    break;
                }
                assert!(
                    started.elapsed() < $crate::sql_common::SIGKILL_DEADLINE,
                    "{left} messages still unacknowledged"
                );
                // Kill while there is work left; past 40 kills let the workers finish.
                if kills < 40 {
                    let victim = rng.below(KILL_WORKERS as u64) as usize;
                    workers.0[victim].kill().unwrap(); // SIGKILL
                    workers.0[victim].wait().unwrap();
                    kills += 1;
                    workers.0[victim] =
                        $crate::sql_common::spawn_worker(role, &args(victim, rng.next()), false);
                }
                for (w, worker) in workers.0.iter_mut().enumerate() {
                    if let Some(status) = worker.try_wait().unwrap() {
                        // It found nothing left to do; restart it if a killed peer left work.
                        assert!(status.success(), "worker {w} failed: {status}");
                        if unacked(&rt) > 0 {
                            *worker =
                                $crate::sql_common::spawn_worker(role, &args(w, rng.next()), false);
                        }
                    }
                }
            }
            drop(workers);
            rt.block_on(async {
                let per_key: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT msg_key, count(*) FROM {effects} GROUP BY msg_key"
                )))
                .fetch_all(&pool)
                .await
                .unwrap();
                let log = $crate::sql_common::attempts_file(&attempts);
                let ran = std::fs::read_to_string(&log).map_or(0, |s| s.lines().count());
                let _ = std::fs::remove_file(&log);
                eprintln!(
                    "{kills} workers killed; {ran} handler executions for {KILL_KEYS} keys; {} effect rows",
                    per_key.iter().map(|(_, n)| n).sum::<i64>()
                );
                assert!(kills > 0, "no worker was killed: the test proved nothing");
                let twice: Vec<_> = per_key.iter().filter(|(_, n)| *n != 1).collect();
                assert!(twice.is_empty(), "effects applied more than once: {twice:?}");
                assert_eq!(per_key.len(), KILL_KEYS, "some keys have no effect");
                for t in [&effects, &queue, &table] {
                    exec(&pool, format!("DROP TABLE {t}")).await;
                }
                exec(&pool, format!("DROP TABLE {table}_migrations")).await;
            });
        }

        async fn sigkill_worker(args: &[String]) {
            let (table, effects, attempts, queue, scope) =
                (&args[0], &args[1], &args[2], &args[3], &args[4]);
            let me: i64 = args[5].parse().unwrap();
            let mut rng = Rng::seeded(args[6].parse().unwrap());
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            // A short lease, so that the lease of a killed worker lapses soon and is taken over.
            let opts = Options::with_scope(scope.clone()).ttl(Duration::from_secs(1));
            let pick = format!(
                "SELECT seq, msg_key FROM {queue} WHERE acked = 0 AND seq >= {} ORDER BY seq LIMIT 8",
                DIALECT.p(1)
            );
            let ack = format!("UPDATE {queue} SET acked = 1 WHERE seq = {}", DIALECT.p(1));
            let attempts = $crate::sql_common::attempts_file(attempts);
            let effect = insert_effect(effects);
            let total = (KILL_KEYS * KILL_COPIES) as u64;
            loop {
                let from = rng.below(total) as i64;
                let mut batch: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(pick.clone()))
                    .bind(from)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    batch = sqlx::query_as(AssertSqlSafe(pick.clone()))
                        .bind(0_i64)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                }
                if batch.is_empty() {
                    return; // everything is acknowledged
                }
                for (seq, key) in batch {
                    let pause = Duration::from_millis(rng.below(40));
                    let (attempts, effect, k) = (attempts.clone(), effect.clone(), key.clone());
                    let out: Result<i64, AppError> = store
                        .run_in_tx(&opts, Call::new(&key), move |tx| {
                            Box::pin(async move {
                                // Counted outside the transaction: every execution, even the
                                // ones a kill rolls back.
                                $crate::sql_common::append_line(&attempts, &format!("{k} {me}"));
                                sqlx::query(AssertSqlSafe(effect))
                                    .bind(&k)
                                    .bind(me)
                                    .execute(&mut **tx)
                                    .await?;
                                // Widen the window in which a kill lands mid-transaction.
                                tokio::time::sleep(pause).await;
                                Ok(me)
                            })
                        })
                        .await;
                    // Done now or before: acknowledge (a kill right here redelivers: a replay).
                    // In flight elsewhere, lease lost, database busy: leave it for later.
                    if out.is_ok() {
                        sqlx::query(AssertSqlSafe(ack.clone()))
                            .bind(seq)
                            .execute(&pool)
                            .await
                            .unwrap();
                    }
                }
            }
        }

        /// The attribute's form of `sigkill_worker`'s handler.
        #[::idem_runtime::idempotent(
            key = "key",
            tx = "tx",
            store = "store",
            scope = "tests.kill_attr",
            ttl = "1s"
        )]
        async fn kill_apply(
            store: &SqlStore<$db>,
            tx: &mut sqlx::Transaction<'_, $db>,
            key: String,
            effects: &str,
            attempts: &std::path::Path,
            me: i64,
            pause: Duration,
        ) -> Result<i64, AppError> {
            // Counted outside the transaction: every execution, even the ones a kill rolls back.
            $crate::sql_common::append_line(attempts, &format!("{key} {me}"));
            sqlx::query(AssertSqlSafe(insert_effect(effects)))
                .bind(&key)
                .bind(me)
                .execute(&mut **tx)
                .await?;
            // Widen the window in which a kill lands mid-transaction.
            tokio::time::sleep(pause).await;
            Ok(me)
        }

        /// `sigkill_worker` through the attribute: the worker begins the transaction, calls the
        /// handler, commits, then acknowledges. (Its scope is fixed; the idem table is the run's.)
        async fn sigkill_attr_worker(args: &[String]) {
            let (table, effects, attempts, queue) = (&args[0], &args[1], &args[2], &args[3]);
            let me: i64 = args[5].parse().unwrap();
            let mut rng = Rng::seeded(args[6].parse().unwrap());
            let pool = $connect().await.expect("the parent reached the server");
            let store = SqlStore::with_table(pool.clone(), table).unwrap();
            let pick = format!(
                "SELECT seq, msg_key FROM {queue} WHERE acked = 0 AND seq >= {} ORDER BY seq LIMIT 8",
                DIALECT.p(1)
            );
            let ack = format!("UPDATE {queue} SET acked = 1 WHERE seq = {}", DIALECT.p(1));
            let attempts = $crate::sql_common::attempts_file(attempts);
            let total = (KILL_KEYS * KILL_COPIES) as u64;
            loop {
                let from = rng.below(total) as i64;
                let mut batch: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(pick.clone()))
                    .bind(from)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    batch = sqlx::query_as(AssertSqlSafe(pick.clone()))
                        .bind(0_i64)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                }
                if batch.is_empty() {
                    return; // everything is acknowledged
                }
                for (seq, key) in batch {
                    let pause = Duration::from_millis(rng.below(40));
                    let mut tx = pool.begin().await.unwrap();
                    let out = kill_apply(&store, &mut tx, key, effects, &attempts, me, pause).await;
                    // The caller commits; a kill before it rolls everything back.
                    let committed = match out {
                        Ok(_) => tx.commit().await.is_ok(),
                        Err(_) => {
                            let _ = tx.rollback().await;
                            false
                        }
                    };
                    // Done now or before: acknowledge (a kill right here redelivers: a replay).
                    // In flight elsewhere, lease lost, database busy: leave it for later.
                    if committed {
                        sqlx::query(AssertSqlSafe(ack.clone()))
                            .bind(seq)
                            .execute(&pool)
                            .await
                            .unwrap();
                    }
                }
            }
        }

        /// The entry point of the worker processes the multi-process tests start. In a normal
        /// test run it does nothing.
        #[test]
        fn worker_process() {
            let Some((role, args)) = $crate::sql_common::worker_role() else {
                return;
            };
            let rt = tokio::runtime::Runtime::new().unwrap();
            match role.as_str() {
                "race" => rt.block_on(race_worker(&args)),
                "sigkill" => rt.block_on(sigkill_worker(&args)),
                "sigkill_attr" => rt.block_on(sigkill_attr_worker(&args)),
                other => panic!("unknown worker role {other}"),
            }
        }
    };
}
