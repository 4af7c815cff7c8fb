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
    /// [`Glue::run`](crate::Glue::run) or [`run_until`](crate::Glue::run_until) was called on a
    /// glue (or a clone of it) whose loop runs or has run. One loop per glue: two loops would
    /// split a partition's records between two workers, and a later record's commit would cover
    /// an earlier one still in flight; and a loop that ended dropped the records it had fetched
    /// but not finished, which the consumer's position is past, so a second loop on the same
    /// consumer would commit past them. Build a new glue (a new consumer of the group: it
    /// starts from the committed offsets).
    #[error("this glue's loop runs or has run: build a new glue to consume again")]
    LoopUsed,
    /// A partition's worker task died (a panic outside the handler, e.g. in
    /// [`GlueBuilder::on_settled`](crate::GlueBuilder::on_settled)) with records queued behind
    /// it. The loop stops rather than start a fresh worker that would commit past them; nothing
    /// after the dead worker's last final record is committed, and the next owner of the
    /// partition gets them again.
    #[error("the worker of {topic} partition {partition} died: the loop stopped")]
    WorkerFailed {
        /// The partition's topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
}

impl Error {
    pub(crate) fn kafka(op: &'static str) -> impl FnOnce(KafkaError) -> Error {
        move |source| Error::Kafka { op, source }
    }
}
