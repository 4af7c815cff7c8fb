//! A second outside review of the glue (the `glue-fixes` merge: dead-letter ids with the
//! consumer, `max_deliver` asked of the server after each failure, failures counted from the
//! glue's own -NAKs). Against the real NATS JetStream; each test is named after what breaks, and
//! fails on the code it was written against.

use std::time::Duration;

use async_nats::jetstream::{self, Message};
use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::ack::Policy;

use crate::AppError;
use crate::support::{self, ConsumerSettings, OrderPaid};

/// The next message of `consumer`, waiting for it up to `within`.
async fn next(consumer: &jetstream::consumer::PullConsumer, within: Duration) -> Option<Message> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(within)
        .messages()
        .await
        .unwrap();
    batch.next().await.map(|m| m.unwrap())
}

/// `Glue::max_deliver` (glue.rs) says "when the server does not answer, the value known last is
/// used", but it falls back to the value cached at `Glue::new` and never keeps what the server
/// answered. A limit lowered under the running glue is seen on one failure; on the next, the
/// consumer-info request fails (a JetStream API timeout during a leader election, a rate limit,
/// a user without `$JS.API.CONSUMER.INFO`: stood in for here by a context whose API prefix has no
/// responders) and the glue falls back to the stale, higher (here unlimited) limit: it `-NAK`s
/// the last delivery JetStream allows, and the message is dropped with no dead letter, the very
/// loss the fetch was added to prevent (it fails open).
#[tokio::test]
async fn a_failed_consumer_info_request_falls_back_to_the_stale_max_deliver_and_the_message_is_dropped()
 {
    let Some(s) = support::servers().await else {
        return;
    };
    let orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let glue = Glue::new(&orders.consumer)
        .policy(Policy::default().backoff(Duration::from_millis(50), Duration::from_millis(50)));
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    // The consumer's limit is lowered under the running glue.
    let settings = ConsumerSettings {
        max_deliver: 2,
        ..ConsumerSettings::default()
    };
    let stream = s.js.get_stream(&orders.name).await.unwrap();
    let updated: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("coupons".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: settings.max_ack_pending,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(updated.cached_info().config.max_deliver, 2);
    orders
        .publish(
            &s.js,
            &OrderPaid {
                id: 1,
                user: 1,
                amount: 100,
            },
        )
        .await;
    // The JetStream API stops answering this process (its acks and publishes still go through).
    let unanswered = jetstream::with_prefix(s.js.client(), "$NOBODY.API");

    let mut settled = Vec::new();
    while let Some(mut msg) = next(&orders.consumer, Duration::from_secs(3)).await {
        let delivered = msg.info().unwrap().delivered;
        if delivered >= 2 {
            // The first failure saw max_deliver = 2 from the server; this one gets no answer.
            msg.context = unanswered.clone();
        }
        let s = glue
            .settle(msg, || async { Err::<(), _>(AppError::Failed) })
            .await
            .unwrap();
        let dead = matches!(s, Settled::DeadLettered { .. });
        settled.push((delivered, s));
        if dead || settled.len() >= 5 {
            break;
        }
    }
    let dead = orders.dead_letters(&s.js).await.len();
    let state = orders.state().await;
    orders.delete(&s.js).await;
    assert_eq!(
        dead, 1,
        "a message that always fails was settled {settled:?} (delivered, settled); dead letters \
         kept: {dead}; the consumer has {} pending, {} ack-pending: JetStream dropped it at \
         max_deliver = 2",
        state.num_pending, state.num_ack_pending
    );
}

/// The consumer-info request `Glue::max_deliver` makes after a failure runs outside the
/// heartbeat (`beat.run`/`beat.hold` send `+WPI` only around the handler and the holds). When
/// the JetStream API is slow (the request waits for the context's timeout, 5 s by default), the
/// message sits in the glue with no progress signal past `ack_wait`, and JetStream delivers it
/// again to another puller while the first delivery is still being settled: the failing handler
/// runs twice at once, and the two settles race (two -NAKs, or a -NAK and a dead letter).
#[tokio::test]
async fn a_slow_consumer_info_request_outlives_ack_wait_without_progress_and_the_message_is_delivered_twice_at_once()
 {
    let Some(s) = support::servers().await else {
        return;
    };
    let orders = support::orders(
        &s.js,
        ConsumerSettings {
            ack_wait: Duration::from_secs(1),
            ..ConsumerSettings::default()
        },
    )
    .await;
    // The -NAK's delay is longer than the test: a delivery the loop below sees is JetStream's
    // ack_wait redelivery, never the one the glue asked for (a 50 ms delay raced the last poll).
    let glue = Glue::new(&orders.consumer)
        .policy(Policy::default().backoff(Duration::from_secs(30), Duration::from_secs(30)));
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    // A JetStream API that takes the request and does not answer in time.
    let slow_prefix = format!("SLOW{}.API", idem_runtime::Token::generate().to_hex());
    let _swallow =
        s.js.client()
            .subscribe(format!("{slow_prefix}.>"))
            .await
            .unwrap();
    s.js.client().flush().await.unwrap();
    let slow = jetstream::with_prefix(s.js.client(), &slow_prefix);
    orders
        .publish(
            &s.js,
            &OrderPaid {
                id: 1,
                user: 1,
                amount: 100,
            },
        )
        .await;
    let mut msg = next(&orders.consumer, Duration::from_secs(3))
        .await
        .unwrap();
    msg.context = slow;
    let settling = {
        let glue = glue.clone();
        tokio::spawn(async move {
            glue.settle(msg, || async { Err::<(), _>(AppError::Failed) })
                .await
        })
    };
    // Another puller of the same consumer, while the first delivery is still in the glue's hands.
    let mut again = None;
    while !settling.is_finished() {
        if let Some(m) = next(&orders.consumer, Duration::from_millis(500)).await {
            again = Some(m.info().unwrap().delivered);
            break;
        }
    }
    let still_settling = !settling.is_finished();
    let first = settling.await.unwrap();
    orders.delete(&s.js).await;
    assert!(
        again.is_none(),
        "while the first delivery was still being settled ({still_settling}; it ended {first:?}), \
         JetStream delivered the message again (delivery {again:?}): the consumer-info request \
         outlived ack_wait (1 s) with no +WPI"
    );
}
