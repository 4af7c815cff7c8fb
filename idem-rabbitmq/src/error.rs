//! What can go wrong while the glue carries out a decision.

/// A decision the glue could not carry out. The delivery is never acked in that case: it stays
/// with the broker, which redelivers it (a copy that did reach its queue meanwhile is a duplicate,
/// and idem answers it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker (or the connection to it) failed: declaring a queue, publishing a copy, or the
    /// ack. A delivery that was not acked is redelivered when its channel closes.
    #[error("RabbitMQ operation `{op}` failed: {source}")]
    Broker {
        /// What the glue was doing.
        op: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not take the copy the decision needed (a publisher nack, or the copy was
    /// returned as unroutable again after the glue had declared its queue anew). The original was
    /// not acked; it was held for the decision's pause (at most 30 s), then handed back to the
    /// queue (`basic.nack` with requeue) so that it is not held forever. Any other error before
    /// the copy was confirmed ([`Error::Broker`] from a declaration or a publish) requeues it in
    /// the same way.
    #[error("RabbitMQ did not confirm the copy for `{queue}` ({why}); the original was requeued")]
    NotConfirmed {
        /// The queue the copy was meant for.
        queue: String,
        /// `"nack"` or `"returned"`.
        why: &'static str,
    },
    /// The delivery could not be acked: its channel closed meanwhile (the broker redelivers it;
    /// a copy the glue published before is then a duplicate, which idem answers), or it had been
    /// acked, nacked or rejected already.
    #[error("the delivery could not be acked: its channel is closed, or it was settled already")]
    NotAcked,
    /// The glue's channel was closed (a channel error) and it has no channel left to open in its
    /// place: it was built with [`build`](crate::GlueBuilder::build) and used its spares. The
    /// original was handed back to the queue. Build the glue with
    /// [`build_shared`](crate::GlueBuilder::build_shared) to have it reopen without limit.
    #[error(
        "the glue's channel is closed and it has no spare channel left; the original was requeued"
    )]
    ChannelClosed,
    /// A queue name the glue would derive is not a valid AMQP short string (over 255 bytes).
    #[error("queue name `{0}` is longer than 255 bytes")]
    InvalidName(String),
}

impl Error {
    pub(crate) fn broker(op: &'static str) -> impl FnOnce(lapin::Error) -> Error {
        move |source| Error::Broker { op, source }
    }
}
