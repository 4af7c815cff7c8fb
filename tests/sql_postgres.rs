//! The SQL store on PostgreSQL (`POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`):
//! the whole conformance suite, migrations, purge, the transactional mode, and several worker
//! processes (racing, and killed with SIGKILL). Skipped loudly without a server, failed under CI.
mod sql_common;
mod support;

static MISSING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn connect() -> Option<idem_runtime::sqlx::PgPool> {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    if let Some(e) = MISSING.get() {
        support::server_missing("PostgreSQL", &url, e);
        return None;
    }
    let pool = idem_runtime::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&url)
        .await;
    match pool {
        Ok(pool) => Some(pool),
        Err(e) => {
            // Remembered, so the other tests skip at once instead of timing out one by one.
            let _ = MISSING.set(e.to_string());
            support::server_missing("PostgreSQL", &url, e);
            None
        }
    }
}

crate::sql_store_tests!(
    idem_runtime::sqlx::Postgres,
    connect,
    sql_common::Dialect {
        text: "TEXT",
        serial_pk: "BIGSERIAL PRIMARY KEY",
        placeholder: sql_common::dollar,
    }
);

/// The watchdog renews leases through a pool of its own. It used to be built from the
/// connection URL alone, so a pool whose `after_connect` sets the schema renewed in another
/// schema: every lease was lost after one ttl. It now keeps the pool's settings and hooks.
#[tokio::test]
async fn renewals_keep_the_pools_after_connect() {
    use std::sync::Arc;
    use std::time::Duration;

    use idem_runtime::sqlx::{self, AssertSqlSafe, postgres::PgPoolOptions};
    use idem_runtime::{Call, Error, Options, PgStore, current_lease, run};

    let Some(admin) = connect().await else { return };
    let schema = format!("idem_hook_{}", std::process::id());
    let create = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(&admin)
        .await
        .unwrap();
    let path: Arc<str> = schema.clone().into();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            let path = path.clone();
            Box::pin(async move {
                let set = format!("SET search_path TO {path}");
                sqlx::raw_sql(AssertSqlSafe(set))
                    .execute(&mut *conn)
                    .await
                    .map(drop)
            })
        })
        .connect_with((*admin.connect_options()).clone())
        .await
        .unwrap();
    let store = PgStore::new(pool);
    store.migrate().await.unwrap();

    let opts = Options::new("sql_postgres::after_connect").ttl(Duration::from_millis(300));
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
    // Ten ttls: without renewals the lease would have lapsed nine times over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let dup: Result<bool, Error> =
            run(&store, &opts, Call::new("order-1"), || async { Ok(true) }).await;
        assert!(matches!(dup, Err(Error::InFlight { .. })), "{dup:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    finish_tx.send(()).unwrap();
    let lost = holder.await.unwrap().expect("the holder completes");
    assert!(!lost, "the lease was lost while the handler ran");
    let drop = format!("DROP SCHEMA {schema} CASCADE");
    sqlx::raw_sql(AssertSqlSafe(drop))
        .execute(&admin)
        .await
        .unwrap();
}

/// A pool that shares a parent's connection budget (what `#[sqlx::test]` gives a test) of fewer
/// connections than the watchdog's pool wanted: building the watchdog's pool panicked inside the
/// call, after the claim.
#[tokio::test]
async fn a_pool_with_a_small_parent_budget_runs() {
    use idem_runtime::sqlx::postgres::PgPoolOptions;
    use idem_runtime::{Call, Error, Options, PgStore, run};

    let Some(admin) = connect().await else { return };
    let connect = (*admin.connect_options()).clone();
    let parent = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(connect.clone());
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .parent(parent)
        .connect_lazy_with(connect);
    let store = PgStore::new(pool);
    store.migrate().await.unwrap();
    let key = format!("order-{}", std::process::id());
    let out: Result<u32, Error> = run(
        &store,
        &Options::new("sql_postgres::parent"),
        Call::new(&key),
        || async { Ok(7) },
    )
    .await;
    assert_eq!(out.unwrap(), 7);
}
