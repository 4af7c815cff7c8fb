//! Shadow mode (process-wide, hence a test binary of its own): claims and marks as usual, but
//! never refuses or replays; what idem would have done is reported and counted. Turned off, the
//! records it kept answer at once.

use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::{CallOutcome, Error, MemoryStore, Would, idempotent, observe, set_shadow};

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = "order", store = "store", scope = "shadow.issue")]
async fn issue(store: &MemoryStore, order: u64) -> Result<u32, Error> {
    Ok(RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn shadow_mode_runs_every_delivery_and_reports_what_it_would_have_done() {
    let store = MemoryStore::new();
    set_shadow(true);
    let (first, report) = observe(issue(&store, 1)).await;
    assert_eq!(
        (first.unwrap(), report.unwrap().outcome),
        (1, CallOutcome::Executed)
    );
    let (second, report) = observe(issue(&store, 1)).await;
    assert_eq!(second.unwrap(), 2, "shadow mode must not replay");
    assert_eq!(
        report.unwrap().outcome,
        CallOutcome::Shadowed {
            would: Would::Replay
        }
    );
    set_shadow(false);
    // Enforcing: the record written while shadowing answers.
    let (third, report) = observe(issue(&store, 1)).await;
    assert_eq!(
        (third.unwrap(), report.unwrap().outcome),
        (1, CallOutcome::Replayed)
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
}
