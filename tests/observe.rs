//! What a call ended with, visible to its caller (`observe`) and on its `idem.call` span, without
//! changing the handler's signature: a first run, a replay, an in-flight refusal, a store outage,
//! a handler's own error, a mismatched payload.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{CallOutcome, Error, MemoryStore, Phase, idempotent, observe};

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
    #[error("declined")]
    Declined,
}

#[idempotent(
    key = "order",
    store = "store",
    scope = "observe.charge",
    fingerprint = "cents"
)]
async fn charge(
    store: &MemoryStore,
    order: u64,
    cents: u32,
    hold: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
) -> Result<u32, AppError> {
    if let Some((started, hold)) = hold {
        let _ = started.send(());
        let _ = hold.await;
    }
    if cents == 0 {
        return Err(AppError::Declined);
    }
    Ok(cents)
}

#[tokio::test]
async fn every_outcome_is_reported_to_the_caller() {
    let store = MemoryStore::new();
    let (out, report) = observe(charge(&store, 1, 500, None)).await;
    let report = report.expect("a report");
    assert_eq!((out.unwrap(), report.outcome), (500, CallOutcome::Executed));
    assert_eq!(report.scope, "observe.charge");
    assert_eq!(report.key.as_ref().unwrap().as_str(), "1");
    assert!(report.fence.is_some());

    let (out, report) = observe(charge(&store, 1, 500, None)).await;
    assert_eq!(
        (out.unwrap(), report.unwrap().outcome),
        (500, CallOutcome::Replayed)
    );

    let (out, report) = observe(charge(&store, 1, 999, None)).await;
    assert!(matches!(out, Err(AppError::Idem(Error::Mismatch { .. }))));
    assert_eq!(report.unwrap().outcome, CallOutcome::Mismatch);

    let (out, report) = observe(charge(&store, 2, 0, None)).await;
    assert!(matches!(out, Err(AppError::Declined)));
    assert_eq!(report.unwrap().outcome, CallOutcome::HandlerError);

    // In flight: a holder parked in its handler.
    let (release, hold) = tokio::sync::oneshot::channel();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let holder = {
        let store = store.clone();
        tokio::spawn(async move { charge(&store, 3, 100, Some((started_tx, hold))).await })
    };
    started.await.unwrap();
    let (out, report) = observe(charge(&store, 3, 100, None)).await;
    assert!(
        matches!(out, Err(AppError::Idem(Error::InFlight { .. }))),
        "{out:?}"
    );
    match report.map(|r| r.outcome) {
        Some(CallOutcome::InFlight { retry_after }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected in flight, got {other:?}"),
    }
    release.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 100);

    // Outside `observe`, nothing is reported and nothing changes.
    assert_eq!(charge(&store, 3, 100, None).await.unwrap(), 100);
}

/// A store that is down: every call fails closed, and says so.
#[tokio::test]
async fn a_store_outage_is_told_apart_from_a_refusal() {
    #[derive(Clone)]
    struct Down;
    #[async_trait::async_trait]
    impl idem_runtime::Store for Down {
        async fn begin(
            &self,
            _: &idem_runtime::BeginRequest<'_>,
        ) -> Result<idem_runtime::Begin, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::unavailable("connection refused"))
        }
        async fn complete(
            &self,
            _: &str,
            _: &idem_runtime::Key,
            _: &idem_runtime::Lease,
            _: &[u8],
            _: Duration,
        ) -> Result<(), idem_runtime::StoreError> {
            unreachable!()
        }
        async fn release(
            &self,
            _: &str,
            _: &idem_runtime::Key,
            _: &idem_runtime::Lease,
        ) -> Result<(), idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::unavailable("connection refused"))
        }
        async fn extend(
            &self,
            _: &str,
            _: &idem_runtime::Key,
            _: &idem_runtime::Lease,
            _: Duration,
        ) -> Result<(), idem_runtime::StoreError> {
            unreachable!()
        }
        fn for_watchdog(&self) -> Arc<dyn idem_runtime::Store> {
            Arc::new(Down)
        }
    }
    let opts = idem_runtime::Options::new("observe.down");
    let (out, report) = observe(idem_runtime::run(
        &Down,
        &opts,
        idem_runtime::Call::new("k"),
        || async { Ok::<u32, Error>(1) },
    ))
    .await;
    assert!(matches!(out, Err(Error::Unavailable { .. })));
    assert_eq!(
        report.unwrap().outcome,
        CallOutcome::StoreUnavailable {
            phase: Phase::Begin
        }
    );
}

/// The broker glue runs the consumer's future inside an `observe` of its own. A consumer that
/// observes its call too (to log a first run apart from a replay, as the README shows) takes the
/// report away from it: the enclosing `observe` gets `None`, and the glue decides as if no
/// idempotent call had been made (an in-flight refusal becomes a handler failure).
#[tokio::test]
async fn an_enclosing_observe_gets_the_report_that_an_inner_observe_also_saw() {
    let store = MemoryStore::new();
    let ((out, inner), outer) = observe(observe(charge(&store, 10, 500, None))).await;
    assert_eq!(out.unwrap(), 500);
    assert_eq!(inner.map(|r| r.outcome), Some(CallOutcome::Executed));
    assert_eq!(
        outer.map(|r| r.outcome),
        Some(CallOutcome::Executed),
        "the enclosing observe (the broker glue's) saw no call"
    );
}
