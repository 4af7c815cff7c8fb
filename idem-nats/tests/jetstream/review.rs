//! An outside review of the glue (issue 17): a dead letter the dead-letter stream drops as a
//! duplicate, a failing message JetStream drops at a `max_deliver` the glue does not know, and a
//! failure count that includes deliveries whose handler never ran. Against the real NATS
//! JetStream; each test is named after what breaks, and fails on the code it was written against.

use std::time::Duration;

use async_nats::jetstream::{self, Message};
use futures_util::StreamExt as _;
use idem_nats::{Glue, Settled};
use idem_runtime::ack::Policy;

use crate::AppError;
use crate::support::{self, ConsumerSettings, OrderPaid, Orders};

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

fn pull_config(name: &str, settings: &ConsumerSettings) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    }
}

/// A stream with two durable consumers (an order feeds the coupons and the e-mails) shares the
/// default dead-letter subject `idem.dead.<stream>`. The glue gives every dead letter the
/// message id `idem-dead:<stream>:<seq>`, without the consumer: when both consumers give up on
/// the same message, the dead-letter stream keeps the first one's copy and acknowledges the
/// second as a duplicate, and the glue then `+TERM`s the second consumer's message. That
/// consumer's dead letter is gone: nothing says that the e-mail was never sent.
#[tokio::test]
async fn a_message_dead_lettered_by_two_consumers_of_one_stream_keeps_only_one_dead_letter() {
    let Some(s) = support::servers().await else {
        return;
    };
    let settings = ConsumerSettings::default();
    let orders: Orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let stream = s.js.get_stream(&orders.name).await.unwrap();
    let emails: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull_config("emails", &settings))
        .await
        .unwrap();
    let policy = Policy::default().max_attempts(1);
    let coupons_glue = Glue::new(&orders.consumer).policy(policy);
    let emails_glue = Glue::new(&emails).policy(policy);
    coupons_glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    // A body no consumer can read.
    orders.publish_raw(&s.js, b"not an order").await;

    let mut settled = Vec::new();
    for (consumer, glue) in [(&orders.consumer, &coupons_glue), (&emails, &emails_glue)] {
        let msg = next(consumer, Duration::from_secs(20)).await.unwrap();
        let payload = msg.payload.clone();
        let s = glue
            .settle(msg, || async {
                serde_json::from_slice::<OrderPaid>(&payload).map_err(AppError::from)
            })
            .await
            .unwrap();
        settled.push(s);
    }
    let dead = orders.dead_letters(&s.js).await;
    let consumers: Vec<String> = dead
        .iter()
        .map(|(_, _, h)| {
            h.get(idem_nats::headers::CONSUMER)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect();
    orders.delete(&s.js).await;
    assert!(
        settled
            .iter()
            .all(|s| matches!(s, Settled::DeadLettered { .. })),
        "{settled:?}"
    );
    assert_eq!(
        consumers,
        ["coupons", "emails"],
        "both consumers settled the message as dead-lettered and terminated it, but the \
         dead-letter stream kept {} dead letter(s)",
        dead.len()
    );
}

/// The glue reads `max_deliver` once, from the consumer's cached info in `Glue::new`. Lowered
/// afterwards (an operator's `nats consumer edit`, a redeploy of the consumer's config while the
/// process runs), the glue still `-NAK`s a failure on the last delivery JetStream allows: the
/// server never delivers it again (a MAX_DELIVERIES advisory is all that says so), and no dead
/// letter is kept.
#[tokio::test]
async fn a_failing_message_is_dropped_without_a_dead_letter_when_max_deliver_is_lowered_under_a_running_glue()
 {
    let Some(s) = support::servers().await else {
        return;
    };
    let mut settings = ConsumerSettings::default();
    let orders = support::orders(&s.js, ConsumerSettings::default()).await;
    let glue = Glue::new(&orders.consumer)
        .policy(Policy::default().backoff(Duration::from_millis(50), Duration::from_millis(50)));
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
    // The consumer's limit is lowered under the running glue.
    settings.max_deliver = 2;
    let stream = s.js.get_stream(&orders.name).await.unwrap();
    let updated: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull_config("coupons", &settings))
        .await
        .unwrap();
    assert_eq!(updated.cached_info().config.max_deliver, 2);
    let mut advisories =
        s.js.client()
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.coupons",
                orders.name
            ))
            .await
            .unwrap();
    s.js.client().flush().await.unwrap();
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

    let mut settled = Vec::new();
    while let Some(msg) = next(&orders.consumer, Duration::from_secs(3)).await {
        let s = glue
            .settle(msg, || async { Err::<(), _>(AppError::Failed) })
            .await
            .unwrap();
        let dead = matches!(s, Settled::DeadLettered { .. });
        settled.push(s);
        if dead || settled.len() >= 5 {
            break;
        }
    }
    let dropped = tokio::time::timeout(Duration::from_secs(5), advisories.next())
        .await
        .ok()
        .flatten()
        .is_some();
    let dead = orders.dead_letters(&s.js).await.len();
    orders.delete(&s.js).await;
    assert_eq!(
        dead, 1,
        "a message that always fails was settled {settled:?}; JetStream's MAX_DELIVERIES \
         advisory came: {dropped}; dead letters kept: {dead}"
    );
}

/// A consumer that dies holding messages it had not started (its pull batch, or a duplicate it
/// was holding in-process) returns them only by letting `ack_wait` pass: JetStream redelivers
/// them with `num_delivered` raised. The glue takes `num_delivered` as the number of failures,
/// so a message whose handler never ran before fails once and is dead-lettered as if it had
/// failed `max_attempts` times. (The RabbitMQ glue does not count these returns, for this very
/// reason: "a consumer killed with 16 deliveries prefetched returns all 16, most never started".)
#[tokio::test]
async fn a_message_returned_by_a_dead_consumer_is_counted_as_a_failure_it_never_had() {
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
    let glue = Glue::new(&orders.consumer).policy(
        Policy::default()
            .max_attempts(2)
            .backoff(Duration::from_millis(50), Duration::from_millis(50)),
    );
    glue.ensure_dead_letter_stream(&s.js).await.unwrap();
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
    // Another process pulls it, and is killed before its loop reaches it.
    {
        let client = async_nats::connect(support::nats_url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let consumer: jetstream::consumer::PullConsumer = js
            .get_stream(&orders.name)
            .await
            .unwrap()
            .get_consumer("coupons")
            .await
            .unwrap();
        let taken = next(&consumer, Duration::from_secs(20)).await.unwrap();
        assert_eq!(support::delivered(&taken), 1);
        drop(taken);
        client.drain().await.unwrap();
    }
    // Redelivered once its ack_wait has passed; its handler runs for the first time and fails.
    let msg = next(&orders.consumer, Duration::from_secs(20))
        .await
        .unwrap();
    let delivered = support::delivered(&msg);
    let settled = glue
        .settle(msg, || async { Err::<(), _>(AppError::Failed) })
        .await
        .unwrap();
    orders.delete(&s.js).await;
    assert!(
        matches!(settled, Settled::Redelivering { attempt: 1, .. }),
        "the handler's first failure (delivery {delivered}) was settled as {settled:?}"
    );
}
