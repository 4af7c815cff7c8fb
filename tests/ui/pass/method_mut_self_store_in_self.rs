use idem_runtime::{MemoryStore, idempotent};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

struct Service {
    idem: MemoryStore,
    prefix: String,
    count: u64,
}

impl Service {
    /// `&mut self` with the store in `self`: the body may read `self` and change the other fields.
    #[idempotent(key = "order_id", store = "self.idem", scope = "tests.handle")]
    async fn handle(&mut self, order_id: u64, note: String) -> Result<String, AppError> {
        self.count += 1;
        Ok(format!("{}{order_id}{note}", self.prefix))
    }
}

fn main() {
    let mut svc = Service {
        idem: MemoryStore::new(),
        prefix: "p-".into(),
        count: 0,
    };
    let _ = svc.handle(1, "n".into());
}
