//! Dead letters. JetStream has no dead-letter queue of its own: the glue publishes the message,
//! its body and headers and why it is dead, to a subject that a stream of the user's captures
//! (by default `idem.dead.<stream>`, captured by the stream `<stream>_DEAD` that
//! [`Glue::ensure_dead_letter_stream`](crate::Glue::ensure_dead_letter_stream) creates), waits
//! for that stream's acknowledgement, and only then terminates the original (`+TERM`).

use async_nats::HeaderMap;
use async_nats::jetstream::Message;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::Info;
use idem_runtime::ack::DeadLetterReason;

/// The headers a dead letter carries beside the original's.
pub mod headers {
    /// Why it is dead: [`DeadLetterReason::as_str`](idem_runtime::ack::DeadLetterReason::as_str)
    /// (`mismatch`, `handler_failed`, ...).
    pub const REASON: &str = "Idem-Dead-Letter-Reason";
    /// The same in words (the reason's `Display`).
    pub const DETAIL: &str = "Idem-Dead-Letter-Detail";
    /// The subject the message was published to.
    pub const SUBJECT: &str = "Idem-Original-Subject";
    /// The stream it was consumed from.
    pub const STREAM: &str = "Idem-Original-Stream";
    /// Its sequence number in that stream.
    pub const SEQUENCE: &str = "Idem-Original-Sequence";
    /// The consumer that gave up on it.
    pub const CONSUMER: &str = "Idem-Original-Consumer";
    /// How many times JetStream had delivered it.
    pub const DELIVERIES: &str = "Idem-Deliveries";
    /// The idempotent handler's scope, when a call reported one (the key is never written).
    pub const SCOPE: &str = "Idem-Scope";
    /// The original's own `Nats-*` headers are kept under this prefix (`Nats-Msg-Id` becomes
    /// `Idem-Original-Nats-Msg-Id`): copied as they were, they would steer the dead-letter
    /// stream (its duplicate window, its expected-sequence checks) instead of describing the
    /// message.
    pub const ORIGINAL_PREFIX: &str = "Idem-Original-";
}

/// The headers of the dead letter of `msg`.
pub(crate) fn dead_letter_headers(
    msg: &Message,
    info: &Info<'_>,
    reason: DeadLetterReason,
    scope: Option<&str>,
) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(original) = &msg.headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            let renamed;
            let name = if name.starts_with("Nats-") {
                renamed = format!("{}{name}", headers::ORIGINAL_PREFIX);
                renamed.as_str()
            } else {
                name
            };
            for value in values {
                out.append(name, value.as_str());
            }
        }
    }
    // Its own message id: a dead letter published again (the +TERM was lost, or the process died
    // between the two) is dropped by the dead-letter stream's duplicate window. The consumer is
    // part of it: two consumers of one stream that give up on the same message each keep theirs.
    out.insert(
        "Nats-Msg-Id",
        format!(
            "idem-dead:{}:{}:{}",
            info.stream, info.consumer, info.stream_sequence
        )
        .as_str(),
    );
    out.insert(headers::REASON, reason.as_str());
    out.insert(headers::DETAIL, reason.to_string().as_str());
    out.insert(headers::SUBJECT, msg.subject.as_str());
    out.insert(headers::STREAM, info.stream);
    out.insert(headers::SEQUENCE, info.stream_sequence.to_string());
    out.insert(headers::CONSUMER, info.consumer);
    out.insert(headers::DELIVERIES, info.delivered.to_string());
    if let Some(scope) = scope {
        out.insert(headers::SCOPE, scope);
    }
    out
}

/// Publish the dead letter; the stream's acknowledgement says it is kept.
pub(crate) async fn publish(
    msg: &Message,
    subject: &str,
    headers: HeaderMap,
) -> Result<(String, u64), async_nats::Error> {
    let ack: PublishAckFuture = msg
        .context
        .publish_with_headers(subject.to_owned(), headers, msg.payload.clone())
        .await?;
    let ack = ack.await?;
    Ok((ack.stream, ack.sequence))
}
