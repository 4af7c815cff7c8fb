//! The whole contract of `protocol.md`, proven on a 3-master Redis Cluster that this test binary
//! starts (`redis-server --cluster-enabled yes` on free loopback ports, `redis-cli --cluster
//! create`) and that dies with it.
mod redis_support;
mod support;

use std::collections::HashSet;
use std::sync::OnceLock;

use idem_runtime::redis::{self, AsyncCommands};
use idem_runtime::{Call, Error, Options, RedisStore, run};
use redis_support::{RedisCluster, cluster_or_skip};

static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();

/// One cluster for every check of this binary (each check has its own runtime, so its own
/// connection).
async fn make_store() -> Option<RedisStore> {
    let cluster = CLUSTER.get_or_init(cluster_or_skip).as_ref()?;
    Some(
        RedisStore::from_cluster_urls(cluster.urls())
            .await
            .expect("connect to the test cluster"),
    )
}

idem_runtime::store_conformance!(make_store());
idem_runtime::operations_conformance!(make_store());

/// Records spread over all three masters, and each record shares its slot with its fence key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_over_the_masters_one_slot_per_record() {
    let Some(store) = make_store().await else {
        return;
    };
    let cluster = CLUSTER.get().unwrap().as_ref().unwrap();
    let scope = format!(
        "cluster-spread-{}",
        idem_runtime::Token::generate().to_hex()
    );
    let opts = Options::with_scope(scope.clone());
    for i in 0..64u32 {
        // Keys with the characters the layout escapes.
        let key = format!("order}}{i}|{{x%");
        let out: Result<u32, Error> =
            run(&store, &opts, Call::new(&key), || async move { Ok(i) }).await;
        assert_eq!(out.unwrap(), i);
    }
    let mut holders = HashSet::new();
    for node in &cluster.nodes {
        let mut conn = redis::Client::open(node.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = conn.keys(format!("idem:{{{scope}|*")).await.unwrap();
        for record in keys.iter().filter(|k| !k.ends_with(":fence")) {
            holders.insert(node.port);
            let fence = format!("{record}:fence");
            let (a, b): (i64, i64) = redis::pipe()
                .cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(record)
                .cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&fence)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(a, b, "{record} and its fence key are on different slots");
        }
    }
    assert_eq!(
        holders.len(),
        3,
        "records are not spread over the three masters"
    );
}
