//! The log lines and counters of the decisions carried out. Keys are logged through their
//! `Display`, which is redacted (`redacted:9f86d081884c`); the key's text is never printed.

use std::time::Duration;

use idem_runtime::Report;
use idem_runtime::ack::{DeadLetterReason, RetryReason};

/// The `broker` label of the counters (`nats`).
pub const BROKER: &str = "nats";

/// A retry carried out: a `-NAK` with a delay, or an in-process hold.
pub(crate) fn redelivery(reason: RetryReason, after: Duration, report: &Option<Report>) {
    let (scope, key) = names(report.as_ref());
    tracing::debug!(
        scope = %scope,
        key = %key,
        reason = reason.as_str(),
        after = ?after,
        "idem-nats: tried again later"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("idem_redeliveries_total", "broker" => BROKER, "reason" => reason.as_str())
        .increment(1);
}

/// A dead letter kept by `stream` at `sequence`.
pub(crate) fn dead_letter(
    reason: DeadLetterReason,
    report: Option<&Report>,
    subject: &str,
    stream: &str,
    sequence: u64,
) {
    let (scope, key) = names(report);
    tracing::warn!(
        scope = %scope,
        key = %key,
        reason = %reason,
        dead_letter_subject = %subject,
        dead_letter_stream = %stream,
        dead_letter_sequence = sequence,
        "idem-nats: dead-lettered"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("idem_dead_letters_total", "broker" => BROKER, "reason" => reason.as_str())
        .increment(1);
}

fn names(report: Option<&Report>) -> (String, String) {
    match report {
        Some(r) => (
            r.scope.to_string(),
            r.key
                .as_ref()
                .map_or_else(|| "none".to_owned(), |k| k.to_string()),
        ),
        None => ("none".to_owned(), "none".to_owned()),
    }
}
