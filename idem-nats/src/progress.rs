//! `+WPI` (AckKind::Progress) while the glue has a message in hand: while the caller's future
//! runs, and while an in-flight duplicate is held. JetStream then neither redelivers it after
//! `ack_wait` nor hands it to another consumer, so a slow handler is not run twice and a held
//! duplicate does not cost a delivery.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use tokio::time::{Instant, sleep_until};

/// The schedule of one message's progress signals.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    every: Duration,
    next: Instant,
    /// Signals sent, for the tests and the logs.
    pub(crate) sent: u32,
}

impl Heartbeat {
    pub(crate) fn new(every: Duration) -> Heartbeat {
        Heartbeat {
            every,
            next: Instant::now() + every,
            sent: 0,
        }
    }

    /// Poll `fut` to its end, signalling progress on `msg` on schedule until `until`; past it the
    /// signals stop (a wedged caller is then redelivered after `ack_wait`, as idem stops renewing
    /// a wedged handler's lease after `max_lease`). No timer fires for a future that ends before
    /// the first signal is due: a fast handler costs one timer registration, no message.
    pub(crate) async fn run<F: Future>(
        &mut self,
        msg: &Message,
        fut: F,
        until: Instant,
    ) -> F::Output {
        let mut fut = pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                () = sleep_until(self.next) => {
                    if Instant::now() < until {
                        self.signal(msg).await;
                    }
                    self.next = Instant::now() + self.every;
                }
            }
        }
    }

    /// Wait `pause` with the message in hand, signalling progress on schedule.
    pub(crate) async fn hold(&mut self, msg: &Message, pause: Duration) {
        let end = Instant::now() + pause;
        while self.next < end {
            sleep_until(self.next).await;
            self.signal(msg).await;
            self.next = Instant::now() + self.every;
        }
        sleep_until(end).await;
    }

    async fn signal(&mut self, msg: &Message) {
        // A signal that does not reach the server costs at most a redelivery after `ack_wait`,
        // which idem answers (in flight, or replayed): log it and go on.
        match msg.ack_with(AckKind::Progress).await {
            Ok(()) => self.sent += 1,
            Err(e) => {
                tracing::debug!(error = %e, "idem-nats: a progress signal (+WPI) was not sent")
            }
        }
    }
}
