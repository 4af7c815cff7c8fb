// Two types of one module with a `handle` method would share the default scope (module path and
// fn name): one's record would answer the other's call. Methods name their scope.
use idem_runtime::{MemoryStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Orders {
    idem: MemoryStore,
}

impl Orders {
    #[idempotent(key = "id", store = "self.idem")]
    async fn handle(&self, id: u64) -> Result<(), AppError> {
        let _ = id;
        Ok(())
    }
}

fn main() {
    let orders = Orders { idem: MemoryStore::new() };
    let _ = orders.handle(1);
}
