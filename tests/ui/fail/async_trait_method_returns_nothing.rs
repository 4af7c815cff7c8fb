// async-trait turns a method that returns nothing into one whose future's output is `()`; it is
// reported as on a plain `async fn`, on the user's signature.
use async_trait::async_trait;
use idem_runtime::idempotent;

#[async_trait]
trait Handler {
    async fn handle(&self, id: u64);
}

struct Service;

#[async_trait]
impl Handler for Service {
    #[idempotent(key = "id", scope = "tests.handle")]
    async fn handle(&self, id: u64) {
        let _ = id;
    }
}

fn main() {}
