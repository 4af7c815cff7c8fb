//! With the `metrics` feature, every call is counted by outcome under `idem_calls_total`, its
//! phases are timed (`idem_phase_seconds`), and renewals and lost leases are counted.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use idem_runtime::{Call, Error, MemoryStore, Options, idempotent, run};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Snapshots drain histograms: the tests of this binary take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The recorder of this test binary (installed once, shared by its tests; each test reads its
/// own scope's series).
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("first recorder of this test binary");
        snapshotter
    })
}

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
    let _turn = SERIAL.lock().await;
    let snapshotter = snapshotter();

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
        if labels["scope"] != "metrics-test" {
            continue;
        }
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

/// The phases of a call are timed, renewals are counted, and a lease that outlives `max_lease`
/// is counted as lost.
#[tokio::test]
async fn phases_are_timed_and_renewals_and_lost_leases_counted() {
    let _turn = SERIAL.lock().await;
    let snapshotter = snapshotter();
    let store = MemoryStore::new();
    let opts = Options::new("metrics-phases").ttl(Duration::from_millis(150));
    // Renewed at least once (every ttl / 3).
    let out: Result<u32, Error> = run(&store, &opts, Call::new("slow"), || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(1)
    })
    .await;
    out.unwrap();
    // Outlives its max_lease: counted as lost.
    let wedged = opts.clone().max_lease(Duration::from_millis(100));
    let out: Result<u32, Error> = run(&store, &wedged, Call::new("wedged"), || async {
        idem_runtime::current_lease().unwrap().lost().await;
        Ok(2)
    })
    .await;
    out.unwrap();

    let mut phases = HashMap::new();
    let (mut renewed, mut lost) = (0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: HashMap<_, _> = key.labels().map(|l| (l.key(), l.value())).collect();
        match (key.name(), value) {
            ("idem_phase_seconds", DebugValue::Histogram(values))
                if labels.get("scope") == Some(&"metrics-phases") =>
            {
                phases.insert(labels["phase"].to_owned(), values.len());
            }
            ("idem_renewals_total", DebugValue::Counter(n)) if labels["result"] == "ok" => {
                renewed = n
            }
            ("idem_lease_lost_total", DebugValue::Counter(n))
                if labels["scope"] == "metrics-phases" =>
            {
                lost = n
            }
            _ => {}
        }
    }
    for phase in ["claim", "handler", "mark"] {
        assert_eq!(phases.get(phase), Some(&2), "phase {phase}: {phases:?}");
    }
    assert!(renewed >= 1, "no renewal was counted");
    assert_eq!(lost, 1);
}

/// A memory store whose renewals fail (the store is down while a handler runs).
#[derive(Clone)]
struct ExtendFails(MemoryStore);

#[async_trait::async_trait]
impl idem_runtime::Store for ExtendFails {
    async fn begin(
        &self,
        req: &idem_runtime::BeginRequest<'_>,
    ) -> Result<idem_runtime::Begin, idem_runtime::StoreError> {
        idem_runtime::Store::begin(&self.0, req).await
    }
    async fn complete(
        &self,
        scope: &str,
        key: &idem_runtime::Key,
        lease: &idem_runtime::Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), idem_runtime::StoreError> {
        idem_runtime::Store::complete(&self.0, scope, key, lease, output, keep).await
    }
    async fn release(
        &self,
        scope: &str,
        key: &idem_runtime::Key,
        lease: &idem_runtime::Lease,
    ) -> Result<(), idem_runtime::StoreError> {
        idem_runtime::Store::release(&self.0, scope, key, lease).await
    }
    async fn extend(
        &self,
        _: &str,
        _: &idem_runtime::Key,
        _: &idem_runtime::Lease,
        _: Duration,
    ) -> Result<(), idem_runtime::StoreError> {
        Err(idem_runtime::StoreError::unavailable(
            "connection refused (injected)",
        ))
    }
    fn for_watchdog(&self) -> std::sync::Arc<dyn idem_runtime::Store> {
        std::sync::Arc::new(self.clone())
    }
}

/// `idem_store_errors_total{scope, phase}` documents the phases `begin`, `complete`, `release`
/// and `extend`. A renewal that fails is counted under `idem_renewals_total{result="failed"}`
/// only: the store-error counter never shows `extend`, so an operator alerting on store errors
/// by phase does not see a store that fails every renewal under running handlers.
#[tokio::test]
async fn a_failed_renewal_is_counted_as_a_store_error_in_the_extend_phase() {
    let _turn = SERIAL.lock().await;
    let snapshotter = snapshotter();
    let store = ExtendFails(MemoryStore::new());
    let opts = Options::new("metrics-extend").ttl(Duration::from_millis(150));
    let out: Result<u32, Error> = run(&store, &opts, Call::new("slow"), || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(1)
    })
    .await;
    let _ = out;
    let (mut failed_renewals, mut extend_errors) = (0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: HashMap<_, _> = key.labels().map(|l| (l.key(), l.value())).collect();
        match (key.name(), value) {
            ("idem_renewals_total", DebugValue::Counter(n)) if labels["result"] == "failed" => {
                failed_renewals = n
            }
            ("idem_store_errors_total", DebugValue::Counter(n))
                if labels.get("scope") == Some(&"metrics-extend")
                    && labels.get("phase") == Some(&"extend") =>
            {
                extend_errors = n
            }
            _ => {}
        }
    }
    assert!(failed_renewals >= 1, "no failed renewal was counted");
    assert!(
        extend_errors >= 1,
        "{failed_renewals} renewal(s) failed; idem_store_errors_total{{phase=\"extend\"}} = {extend_errors}"
    );
}

/// `idem_phase_seconds{phase="claim"}` is documented as the time "until the lease or the
/// answer". A replay (an answer) is never timed: the claim timer is only stopped once a lease is
/// granted, so the claim histogram shows first runs only, and a store that answers replays
/// slowly is invisible in it.
#[tokio::test]
async fn a_replay_is_timed_in_the_claim_phase() {
    let _turn = SERIAL.lock().await;
    let snapshotter = snapshotter();
    let _ = snapshotter.snapshot(); // drain
    let store = MemoryStore::new();
    let opts = Options::new("metrics-claim-replay");
    for _ in 0..2 {
        let out: Result<u32, Error> = run(&store, &opts, Call::new("k"), || async { Ok(1) }).await;
        out.unwrap();
    }
    let mut claims = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: HashMap<_, _> = key.labels().map(|l| (l.key(), l.value())).collect();
        if let ("idem_phase_seconds", DebugValue::Histogram(values)) = (key.name(), value)
            && labels.get("scope") == Some(&"metrics-claim-replay")
            && labels.get("phase") == Some(&"claim")
        {
            claims = values.len();
        }
    }
    assert_eq!(
        claims, 2,
        "a first run and a replay: {claims} claim(s) timed"
    );
}
