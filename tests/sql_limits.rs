//! A done mark the database refuses every time (an output larger than MariaDB's
//! `max_allowed_packet`) used to release the key by expiry, and the handler ran again on every
//! delivery, forever. The key is now marked done without the output: the handler ran once, and
//! duplicates are told there is nothing to replay. (MYSQL_URL, default
//! mysql://root@127.0.0.1:3306/test.)

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem_runtime::sqlx::{self, MySqlPool};
use idem_runtime::{Call, Error, MySqlStore, Options, Token, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_database_refuses_is_done_but_not_replayed() {
    let url =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let pool = match MySqlPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => return support::server_missing("MariaDB/MySQL", &url, e),
    };
    let packet: u64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
        .fetch_one(&pool)
        .await
        .unwrap();
    let store = MySqlStore::new(pool);
    store.migrate().await.unwrap();
    // Above what the server takes in one statement, below the (raised) bound idem applies.
    let size = packet as usize + 1024 * 1024;
    let opts = Options::with_scope(format!("limits:{}", Token::generate().to_hex()))
        .max_output(size * 2)
        .ttl(Duration::from_secs(30));
    let runs = AtomicU32::new(0);
    for delivery in 0..3 {
        let out: Result<Vec<u8>, Error> = run(&store, &opts, Call::new("report-1"), || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(vec![1u8; size])
        })
        .await;
        match (delivery, out) {
            (0, Ok(v)) => assert_eq!(v.len(), size),
            (_, Err(Error::Unreplayable { reason, .. })) => {
                assert!(reason.contains("refused"), "{reason}")
            }
            (n, other) => panic!("delivery {n}: {:?}", other.map(|v| v.len())),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
}
