//! The `idem` binary run as a process against real stores: Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`), PostgreSQL (`POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), MariaDB/MySQL (`MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`) and SQLite (a temporary file). A server that is absent
//! fails the test under `CI=true`, and skips it loudly otherwise.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::{Call, Error, Key, KeyState, Operations, Options, StoreHandle, run};
use serde_json::Value;

/// Run `idem --store <url> <args…>`; `url` may be followed by global options (`--table t`),
/// separated by spaces.
fn idem(url: &str, args: &[&str]) -> Output {
    let mut words = url.split(' ');
    std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("--store")
        .arg(words.next().unwrap())
        .args(words)
        .args(args)
        .env_remove("IDEM_STORE")
        .output()
        .expect("the idem binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn unique_scope(store: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("cli-{store}-{}-{nanos}", std::process::id())
}

/// A done key, shown, counted, listed and forgotten; a live lease refused without `--force`.
async fn scenario<S>(url: &str, name: &str, store: &S)
where
    S: StoreHandle + Operations,
{
    let scope = unique_scope(name);
    let opts = Options::with_scope(scope.clone());
    let executions = Arc::new(AtomicU32::new(0));
    let deliver = || {
        let executions = executions.clone();
        run(store, &opts, Call::new(&1001u64), move || async move {
            executions.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, Error>(7)
        })
    };

    // A done key, written by run with an integer key, is found by its decimal text.
    assert_eq!(deliver().await.unwrap(), 7);
    let out = idem(url, &["inspect", &scope, "1001", "--json"]);
    assert_eq!(code(&out), 0, "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(v["state"]["name"], "done", "{v}");
    let text = idem(url, &["inspect", &scope, "1001"]);
    assert_eq!(code(&text), 0);
    assert!(String::from_utf8_lossy(&text.stdout).contains("state: done"));

    let out = idem(url, &["stats", &scope, "--json"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(stdout_json(&out)["counts"]["done"], 1);
    // `counts`, the old name, is an alias.
    let alias = idem(url, &["counts", &scope, "--json"]);
    assert_eq!(alias.stdout, out.stdout, "{alias:?}");

    let out = idem(
        url,
        &["list", &scope, "--state", "done", "--json", "--reveal"],
    );
    assert_eq!(code(&out), 0, "{out:?}");
    let v = stdout_json(&out);
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{v}");
    assert_eq!(keys[0]["key"], "1001");
    // Without --reveal, the key is redacted.
    let v = stdout_json(&idem(url, &["list", &scope, "--state", "done", "--json"]));
    let shown = v["keys"][0]["key"].as_str().unwrap().to_owned();
    assert!(shown.starts_with("redacted:"), "{v}");

    // A duplicate replays; forgotten, the next delivery runs again.
    assert_eq!(deliver().await.unwrap(), 7);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    // Without --yes, and stdin not a terminal: refused (exit 2), the key unchanged.
    let out = idem(url, &["forget", &scope, "1001"]);
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--yes"),
        "{out:?}"
    );
    let v = stdout_json(&idem(url, &["inspect", &scope, "1001", "--json"]));
    assert_eq!(v["state"]["name"], "done", "{v}");
    let out = idem(url, &["forget", &scope, "1001", "--yes"]);
    assert_eq!(code(&out), 0, "{out:?}");
    let v = stdout_json(&idem(url, &["inspect", &scope, "1001", "--json"]));
    assert_eq!(v["state"]["name"], "forgotten", "{v}");
    assert_eq!(deliver().await.unwrap(), 7);
    assert_eq!(executions.load(Ordering::SeqCst), 2);

    // A key with no record: exit 1.
    let out = idem(url, &["inspect", &scope, "no-such-key"]);
    assert_eq!(code(&out), 1, "{out:?}");
    assert_eq!(
        code(&idem(url, &["forget", &scope, "no-such-key", "--yes"])),
        1
    );

    // A live lease: release and forget refuse it without --force (exit 2).
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let holder = run(store, &opts, Call::new("order-1004"), move || async move {
        let _ = rx.await;
        Ok::<u32, Error>(9)
    });
    let operator = async {
        let key = Key::new("order-1004").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !matches!(
            store.inspect(&scope, &key).await.unwrap(),
            KeyState::InFlight { lapsed: false, .. }
        ) {
            assert!(tokio::time::Instant::now() < deadline, "never in flight");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let scope = scope.clone();
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            let v = stdout_json(&idem(&url, &["inspect", &scope, "order-1004", "--json"]));
            assert_eq!(v["state"]["name"], "in_flight", "{v}");
            let refused = idem(&url, &["release", &scope, "order-1004", "--yes"]);
            assert_eq!(code(&refused), 2, "{refused:?}");
            assert!(
                String::from_utf8_lossy(&refused.stderr).contains("--force"),
                "{refused:?}"
            );
            assert_eq!(
                code(&idem(&url, &["forget", &scope, "order-1004", "-y"])),
                2
            );
            let list = stdout_json(&idem(
                &url,
                &["list", &scope, "--state", "in-flight", "--json", "--reveal"],
            ));
            assert_eq!(list["keys"][0]["key"], "order-1004", "{list}");
            let text = idem(&url, &["list", &scope, "--state", "in-flight"]);
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(!text.contains("order-1004"), "{text}");
            assert!(text.contains("redacted:"), "{text}");
            let text = idem(&url, &["list", &scope, "--state", "in-flight", "--reveal"]);
            assert!(String::from_utf8_lossy(&text.stdout).contains("order-1004"));
            // The key typed is echoed redacted too, unless --reveal.
            let refused = String::from_utf8_lossy(&refused.stderr).into_owned();
            assert!(!refused.contains("order-1004"), "{refused}");
            let shown = idem(&url, &["inspect", &scope, "order-1004", "--reveal"]);
            assert!(String::from_utf8_lossy(&shown.stdout).contains("key:   order-1004"));
            let counts = stdout_json(&idem(&url, &["stats", &scope, "--json"]));
            assert_eq!(counts["counts"]["in_flight"], 1, "{counts}");
            let forced = idem(
                &url,
                &[
                    "release",
                    &scope,
                    "order-1004",
                    "--force",
                    "--json",
                    "--yes",
                ],
            );
            assert_eq!(code(&forced), 0, "{forced:?}");
            assert_eq!(stdout_json(&forced)["result"], "freed");
        })
        .await
        .unwrap();
        let _ = tx.send(());
    };
    let (held, ()) = tokio::join!(holder, operator);
    // The old holder's late mark is refused: it does not overwrite the released key.
    assert!(
        held.is_err(),
        "the released holder's mark must be refused: {held:?}"
    );
    let v = stdout_json(&idem(url, &["inspect", &scope, "order-1004", "--json"]));
    assert_ne!(v["state"]["name"], "done", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = idem_runtime::RedisStore::from_url(&url).await.unwrap();
    if let Err(e) = store.counts("cli-probe").await {
        return support::server_missing("Redis", &url, e);
    }
    scenario(&url, "redis", &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_prefix() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = idem_runtime::redis::Client::open(url.as_str()).unwrap();
    let store = idem_runtime::RedisStore::builder_from_client(client)
        .unwrap()
        .prefix("cli-test:")
        .build();
    if let Err(e) = store.counts("cli-probe").await {
        return support::server_missing("Redis", &url, e);
    }
    let scope = unique_scope("redis-prefix");
    let opts = Options::with_scope(scope.clone());
    run(&store, &opts, Call::new(&5u64), || async {
        Ok::<u32, Error>(1)
    })
    .await
    .unwrap();
    let found = idem(&url, &["--prefix", "cli-test:", "inspect", &scope, "5"]);
    assert_eq!(code(&found), 0, "{found:?}");
    // Under the default prefix the key is not there.
    assert_eq!(code(&idem(&url, &["inspect", &scope, "5"])), 1);
    let out = idem(&url, &["purge", "--json", "--yes"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(stdout_json(&out)["purged"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let url = std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = match idem_runtime::sqlx::PgPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => return support::server_missing("PostgreSQL", &url, e),
    };
    let store = idem_runtime::SqlStore::with_table(pool, "idem_cli_keys").unwrap();
    // `idem migrate` creates the tables the stores then use.
    let out = idem(&url, &["migrate"]);
    assert_eq!(code(&out), 0, "{out:?}");
    let out = idem(&url, &["--table", "idem_cli_keys", "migrate"]);
    assert_eq!(code(&out), 0, "{out:?}");
    let scope = unique_scope("postgres-table");
    run(
        &store,
        &Options::with_scope(scope.clone()),
        Call::new(&1u64),
        || async { Ok::<u32, Error>(3) },
    )
    .await
    .unwrap();
    // Not in the default table.
    assert_eq!(code(&idem(&url, &["inspect", &scope, "1"])), 1);
    assert_eq!(
        code(&idem(
            &url,
            &["inspect", &scope, "1", "--table", "idem_cli_keys"]
        )),
        0
    );
    scenario(&format!("{url} --table idem_cli_keys"), "postgres", &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb() {
    let url =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let pool = match idem_runtime::sqlx::MySqlPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => return support::server_missing("MySQL/MariaDB", &url, e),
    };
    let store = idem_runtime::SqlStore::new(pool);
    store.migrate().await.unwrap();
    scenario(&url, "mysql", &store).await;
    // mariadb:// names the same server.
    let mariadb = url.replacen("mysql://", "mariadb://", 1);
    assert_eq!(code(&idem(&mariadb, &["stats", "cli-probe"])), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = std::env::temp_dir().join(format!("idem-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("idem.sqlite");
    let store = idem_runtime::SqliteStore::open(&path).await.unwrap();
    let url = format!("sqlite://{}", path.display());
    scenario(&url, "sqlite", &store).await;

    // purge deletes a done record past its keep (the shortest keep is 1 s).
    let scope = unique_scope("sqlite-purge");
    let opts = Options::with_scope(scope.clone()).keep(Duration::from_secs(1));
    run(&store, &opts, Call::new(&1u64), || async {
        Ok::<u32, Error>(1)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Without --yes: refused, nothing deleted (the purge with --yes below still finds the row).
    let out = idem(&url, &["purge", "--json"]);
    assert_eq!(code(&out), 2, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = idem(&url, &["purge", "--json", "--yes"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert!(
        stdout_json(&out)["purged"].as_u64().unwrap() >= 1,
        "{out:?}"
    );
    assert_eq!(code(&idem(&url, &["inspect", &scope, "1"])), 1);
    drop(store);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn migrate_print_applies_nothing() {
    let dir = std::env::temp_dir().join(format!("idem-cli-print-{}", std::process::id()));
    let path = dir.join("never.sqlite");
    let url = format!("sqlite://{}", path.display());
    let out = idem(&url, &["migrate", "--print"]);
    assert_eq!(code(&out), 0, "{out:?}");
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS idem_keys ("),
        "{sql}"
    );
    assert!(sql.contains("INSERT INTO idem_keys_migrations"), "{sql}");
    assert!(!path.exists(), "--print created the database");
    // Every SQL store, and --table; nothing is connected to (nothing listens on port 1).
    for url in [
        "postgres://postgres@127.0.0.1:1/test",
        "mysql://root@127.0.0.1:1/test",
    ] {
        let out = idem(url, &["--table", "app.keys", "migrate", "--print"]);
        assert_eq!(code(&out), 0, "{url}: {out:?}");
        let sql = String::from_utf8_lossy(&out.stdout);
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS app.keys ("),
            "{sql}"
        );
    }
    let out = idem("redis://127.0.0.1:1", &["migrate", "--print", "--json"]);
    assert_eq!(code(&out), 0, "{out:?}");
    assert_eq!(stdout_json(&out)["sql"], Value::Null);
}

#[test]
fn bad_and_unreachable_stores() {
    // Not a URL idem knows: a usage error.
    let out = idem("foo://x", &["stats", "s"]);
    assert_eq!(code(&out), 64, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad store URL"));
    // A table name that is not an identifier.
    let out = idem(
        "postgres://postgres@127.0.0.1:5432/test",
        &["--table", "x; DROP TABLE y", "stats", "s"],
    );
    assert_eq!(code(&out), 64, "{out:?}");
    // Nothing listens: unreachable, a clear message, no panic.
    for url in [
        "redis://127.0.0.1:1",
        "postgres://postgres:hunter2@127.0.0.1:1/test",
        "mysql://root@127.0.0.1:1/test",
    ] {
        let out = idem(url, &["stats", "s"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 3, "{url}: {out:?}");
        assert!(err.contains("unreachable"), "{url}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("hunter2"), "the password is shown: {err}");
    }
    // No store at all.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["stats", "s"])
        .env_remove("IDEM_STORE")
        .output()
        .unwrap();
    assert_eq!(code(&out), 64, "{out:?}");
}
