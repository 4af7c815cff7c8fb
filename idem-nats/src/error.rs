//! What `settle` answers when it could not carry its decision out.

/// The glue could not carry out its decision. The message was not acknowledged, so JetStream
/// redelivers it once its `ack_wait` has passed (nothing is lost); the error says which verb
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message has no JetStream ack subject (it came from a core NATS subscription, or its
    /// reply subject does not parse): it cannot be acknowledged, and the glue did not run it.
    #[error("not a JetStream message (no parsable $JS.ACK reply subject): it cannot be settled")]
    NotJetStream,
    /// The server did not take (or, for a double ack, did not confirm) a verb.
    #[error("the broker did not take the {verb}: {source}")]
    Broker {
        /// `ack`, `nak` or `term`.
        verb: &'static str,
        /// What the client said.
        #[source]
        source: async_nats::Error,
    },
}

impl Error {
    pub(crate) fn broker(verb: &'static str) -> impl FnOnce(async_nats::Error) -> Error {
        move |source| Error::Broker { verb, source }
    }
}
