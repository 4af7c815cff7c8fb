//! What can go wrong building the glue or running its loop.

use rdkafka::error::KafkaError;

/// An error of the glue. A record is never committed because of an error: an error either stops
/// the loop before the record's outcome is final (the broker redelivers it to whoever owns the
/// partition next, and idem answers the duplicate), or is retried inside the loop (a dead letter
/// that the broker did not take, a commit that failed: see [`Stats`](crate::Stats)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Kafka client failed: creating the consumer or the producer, subscribing, a fatal
    /// consumer error, or the final synchronous commit of [`Glue::run_until`](crate::Glue::run_until).
    #[error("Kafka operation `{op}` failed: {source}")]
    Kafka {
        /// What the glue was doing.
        op: &'static str,
        /// rdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The configuration cannot work with the glue: `group.id` or `bootstrap.servers` missing,
    /// or a setting the glue owns (`enable.auto.commit`, `enable.auto.offset.store`) set to
    /// `true`.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

impl Error {
    pub(crate) fn kafka(op: &'static str) -> impl FnOnce(KafkaError) -> Error {
        move |source| Error::Kafka { op, source }
    }
}
