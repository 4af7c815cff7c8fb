//! The queues the glue needs beside the consumer's own: a dead-letter queue, and delay queues
//! that hand a message back to the consumer's queue after a fixed time.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::Error;

/// The kind of queue the glue declares for its delay and dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueKind {
    /// Quorum queues (the default). A delay queue then dead-letters **at least once**
    /// (`x-dead-letter-strategy: at-least-once`): a message moves back to the consumer's queue
    /// only once that queue has confirmed it, so none is lost on the way, even when the
    /// consumer's queue is full (`reject-publish`) or briefly unavailable.
    #[default]
    Quorum,
    /// Classic queues: lighter, but RabbitMQ moves dead letters out of a classic queue **at most
    /// once**; a message expiring while the consumer's queue refuses it is dropped by the broker.
    Classic,
}

/// The names and arguments of the glue's queues for one consumer queue `q`:
///
/// | queue | what it is | declared by |
/// |---|---|---|
/// | `q` | the consumer's queue (yours) | you; give it [`Topology::queue_arguments`] so that the broker's own dead letters (a quorum queue's `x-delivery-limit`, a `basic.reject`) also end in `q.dead-letter` |
/// | `q.dead-letter` | dead letters, with their body, properties and `x-idem-reason` headers | the glue, at [`build`](crate::GlueBuilder::build) |
/// | `q.idem-delay.<n>ms` | a delay queue: `x-message-ttl` = n ms, then dead-lettered back to `q` through the default exchange | the glue, when a delay of that length is first needed |
///
/// Delays are rounded up to a power of two of milliseconds (128 ms, 256 ms, ... 65,536 ms), one
/// queue each: every message in one delay queue has the same TTL, so the one at the head always
/// expires first (RabbitMQ expires messages only at the head of a queue; one queue of mixed
/// per-message TTLs would hold a 100 ms retry behind a 60 s one). The delay queues are never
/// consumed from, hold messages only while they wait, and are not deleted by the glue: no
/// `x-expires`, which would drop what they hold. Do not put an `expires` policy on them either:
/// a queue never consumed counts as unused however many copies it holds, and RabbitMQ applies
/// the lower of policy and argument, so the glue cannot override it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    dead_letter: String,
    kind: QueueKind,
}

/// The longest delay queue's TTL (2^22 ms, about 70 min): a longer pause is cut to it.
const MAX_DELAY_MS: u64 = 1 << 22;

impl Topology {
    /// The glue's queues for the consumer queue `queue`, with the default dead-letter queue
    /// `{queue}.dead-letter`.
    ///
    /// ```
    /// let t = idem_rabbitmq::Topology::new("orders");
    /// assert_eq!(t.dead_letter_queue(), "orders.dead-letter");
    /// assert_eq!(t.delay_queue(std::time::Duration::from_millis(100)).0, "orders.idem-delay.128ms");
    /// ```
    pub fn new(queue: &str) -> Topology {
        Topology {
            queue: queue.to_owned(),
            dead_letter: format!("{queue}.dead-letter"),
            kind: QueueKind::default(),
        }
    }

    /// Use another dead-letter queue.
    pub fn with_dead_letter_queue(mut self, name: &str) -> Topology {
        self.dead_letter = name.to_owned();
        self
    }

    /// The kind of queue for the delay and dead-letter queues.
    pub fn with_kind(mut self, kind: QueueKind) -> Topology {
        self.kind = kind;
        self
    }

    /// The consumer's queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Where dead letters go.
    pub fn dead_letter_queue(&self) -> &str {
        &self.dead_letter
    }

    /// The arguments to declare the consumer's queue with, so that what the broker dead-letters
    /// by itself lands in the dead-letter queue too: `x-dead-letter-exchange` = `""` (the default
    /// exchange) and `x-dead-letter-routing-key` = the dead-letter queue. Add your own
    /// (`x-queue-type`, `x-delivery-limit`) to the table it returns.
    ///
    /// ```
    /// let args = idem_rabbitmq::Topology::new("orders").queue_arguments();
    /// assert!(args.contains_key("x-dead-letter-routing-key"));
    /// ```
    pub fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.dead_letter),
        );
        args
    }

    /// The delay queue that holds a message for at least `after`: its name and its TTL.
    pub fn delay_queue(&self, after: Duration) -> (String, Duration) {
        let ms = u64::try_from(after.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_DELAY_MS)
            .next_power_of_two();
        (
            format!("{}.idem-delay.{ms}ms", self.queue),
            Duration::from_millis(ms),
        )
    }

    /// Check that every name the glue derives is a valid AMQP queue name.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let longest = self.delay_queue(Duration::from_millis(MAX_DELAY_MS)).0;
        for name in [&self.queue, &self.dead_letter, &longest] {
            if ShortString::try_new(name.as_str()).is_err() {
                return Err(Error::InvalidName(name.clone()));
            }
        }
        Ok(())
    }

    fn kind_arguments(&self, args: &mut FieldTable) {
        match self.kind {
            QueueKind::Quorum => {
                args.insert("x-queue-type".into(), long_string("quorum"));
            }
            QueueKind::Classic => {
                args.insert("x-queue-type".into(), long_string("classic"));
            }
        }
    }

    /// Declare the dead-letter queue (durable).
    pub(crate) async fn declare_dead_letter(&self, channel: &Channel) -> Result<(), Error> {
        let mut args = FieldTable::default();
        self.kind_arguments(&mut args);
        channel
            .queue_declare(
                self.dead_letter.as_str().into(),
                QueueDeclareOptions::durable(),
                args,
            )
            .await
            .map_err(Error::broker("queue.declare (dead letters)"))?;
        Ok(())
    }

    /// Declare the delay queue `name` whose messages go back to the consumer's queue after `ttl`.
    pub(crate) async fn declare_delay(
        &self,
        channel: &Channel,
        name: &str,
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut args = FieldTable::default();
        self.kind_arguments(&mut args);
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert("x-dead-letter-routing-key".into(), long_string(&self.queue));
        if self.kind == QueueKind::Quorum {
            // At-least-once dead-lettering needs `reject-publish` overflow (RabbitMQ 3.10+).
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
        }
        channel
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(Error::broker("queue.declare (delay)"))?;
        Ok(())
    }
}

pub(crate) fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_power_of_two_of_milliseconds() {
        let t = Topology::new("q");
        let ms = |n| t.delay_queue(Duration::from_millis(n)).1.as_millis();
        assert_eq!(ms(0), 1);
        assert_eq!(ms(100), 128);
        assert_eq!(ms(128), 128);
        assert_eq!(ms(1000), 1024);
        assert_eq!(ms(60_000), 65_536);
        assert_eq!(ms(u64::MAX), 1 << 22);
        assert_eq!(
            t.delay_queue(Duration::from_secs(1)).0,
            "q.idem-delay.1024ms"
        );
    }

    #[test]
    fn over_long_names_are_refused() {
        assert!(Topology::new(&"q".repeat(240)).validate().is_err());
        assert!(Topology::new("orders").validate().is_ok());
    }
}
