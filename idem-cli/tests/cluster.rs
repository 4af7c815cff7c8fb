//! The `idem` binary on a 3-master Redis Cluster that this test starts (`redis-server
//! --cluster-enabled yes` on free loopback ports, `redis-cli --cluster create`, as the runtime's
//! cluster tests do), named by `redis+cluster://host:port,host:port,host:port`. Without
//! `redis-server` the test fails under `CI=true`, and skips loudly otherwise.

#[path = "../../tests/redis_support/mod.rs"]
mod redis_support;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::Output;

use idem_runtime::{Call, Error, Options, RedisStore, run};
use serde_json::Value;

fn idem(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("--store")
        .arg(url)
        .args(args)
        .env_remove("IDEM_STORE")
        .output()
        .expect("the idem binary runs")
}

fn json(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let Some(cluster) = redis_support::cluster_or_skip() else {
        return;
    };
    let store = RedisStore::from_cluster_urls(cluster.urls()).await.unwrap();
    let opts = Options::with_scope("cli-cluster");
    // Keys on every master (records spread over the cluster by their hash tag).
    for i in 0..24u32 {
        run(
            &store,
            &opts,
            Call::new(&format!("order-{i}")),
            || async move { Ok::<u32, Error>(i) },
        )
        .await
        .unwrap();
    }
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr()).collect();
    let url = format!("redis+cluster://{}", addrs.join(","));

    let v = json(&idem(
        &url,
        &["inspect", "cli-cluster", "order-7", "--json"],
    ));
    assert_eq!(v["state"]["name"], "done", "{v}");
    let v = json(&idem(&url, &["stats", "cli-cluster", "--json"]));
    assert_eq!(v["counts"]["done"], 24, "{v}");
    // list pages over every primary.
    let v = json(&idem(&url, &["list", "cli-cluster", "--reveal", "--json"]));
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 24, "{v}");
    assert!(keys.iter().any(|k| k["key"] == "order-23"), "{v}");
    let v = json(&idem(
        &url,
        &["forget", "cli-cluster", "order-7", "--yes", "--json"],
    ));
    assert_eq!(v["result"], "freed", "{v}");
    let v = json(&idem(
        &url,
        &["inspect", "cli-cluster", "order-7", "--json"],
    ));
    assert_eq!(v["state"]["name"], "forgotten", "{v}");

    // Any one node is enough to find the cluster.
    let one = format!("redis+cluster://{}", addrs[1]);
    let v = json(&idem(&one, &["stats", "cli-cluster", "--json"]));
    assert_eq!(v["counts"]["done"], 23, "{v}");
}

#[test]
fn unreachable_and_bad_cluster_urls() {
    let out = idem("redis+cluster://127.0.0.1:1", &["stats", "s"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = idem("redis+cluster://127.0.0.1", &["stats", "s"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}
