// async-trait rewrites the method before #[idempotent] sees it; the missing scope is still
// reported on the user's `self`.
use async_trait::async_trait;
use idem_runtime::{MemoryStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[async_trait]
trait Handler {
    async fn handle(&self, id: u64) -> Result<u64, AppError>;
}

struct Service {
    idem: MemoryStore,
}

#[async_trait]
impl Handler for Service {
    #[idempotent(key = "id", store = "self.idem")]
    async fn handle(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

fn main() {}
