//! With the `metrics` feature, every call is counted by outcome under `idem_calls_total`.

use std::collections::HashMap;

use idem_runtime::{Error, MemoryStore, idempotent};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error("declined")]
    Declined,
}

struct Svc {
    idem: MemoryStore,
}

impl Svc {
    #[idempotent(key = "id", store = "self.idem", scope = "metrics-test")]
    async fn handle(&self, id: u64, ok: bool) -> Result<u64, AppError> {
        if ok { Ok(id) } else { Err(AppError::Declined) }
    }
}

#[tokio::test]
async fn outcomes_are_counted_per_scope() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("first recorder of this test binary");

    let svc = Svc {
        idem: MemoryStore::new(),
    };
    assert!(svc.handle(1, false).await.is_err()); // handler_error, key released
    assert_eq!(svc.handle(1, true).await.unwrap(), 1); // executed
    assert_eq!(svc.handle(1, true).await.unwrap(), 1); // replayed
    assert_eq!(svc.handle(1, false).await.unwrap(), 1); // replayed: the handler does not run

    let mut counts = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() != "idem_calls_total" {
            continue;
        }
        let labels: HashMap<_, _> = key.labels().map(|l| (l.key(), l.value())).collect();
        assert_eq!(labels["scope"], "metrics-test");
        let DebugValue::Counter(n) = value else {
            panic!("not a counter")
        };
        counts.insert(labels["outcome"].to_owned(), n);
    }
    let expected = HashMap::from([
        ("handler_error".to_owned(), 1),
        ("executed".to_owned(), 1),
        ("replayed".to_owned(), 2),
    ]);
    assert_eq!(counts, expected);
}
