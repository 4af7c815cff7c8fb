//! A second outside review of the glue (the `glue-fixes` merge: copies persistent, a queue
//! declared again when a copy comes back unroutable). Against the real RabbitMQ; each test is
//! named after what breaks, and fails on the code it was written against.
mod support;

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use idem_rabbitmq::QueueKind;
use idem_runtime::ack::Policy;
use idem_runtime::{MemoryStore, idempotent};
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};

use support::*;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
}

#[idempotent(key = "key", store = "store", scope = "idem_rabbitmq.review2.plain")]
async fn plain(store: &MemoryStore, key: &str) -> Result<u64, AppError> {
    Ok(1)
}

async fn consumer(channel: &lapin::Channel, queue: &str) -> Consumer {
    channel
        .basic_qos(4, BasicQosOptions::default())
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn next_within(consumer: &mut Consumer, d: Duration) -> Option<lapin::message::Delivery> {
    tokio::time::timeout(d, consumer.next())
        .await
        .ok()
        .flatten()
        .map(|d| d.unwrap())
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A vhost of this test's own (so that a limit set on it touches no other test), removed on drop.
struct Vhost(String);

impl Vhost {
    fn new() -> Option<Vhost> {
        let name = unique("idem_rev2");
        if !rabbitmqctl(&["add_vhost", &name]) {
            eprintln!("!!!!! SKIPPED: rabbitmqctl is not usable here");
            return None;
        }
        let v = Vhost(name);
        assert!(rabbitmqctl(&[
            "set_permissions",
            "-p",
            &v.0,
            "guest",
            ".*",
            ".*",
            ".*"
        ]));
        Some(v)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// `publish_copy` (settle.rs) answers a copy returned as unroutable by declaring its queue again
/// (`declare_again`) with `?`: when that declaration fails (here a vhost queue limit; equally a
/// user without `configure` permission, a policy clash), `settle` returns the error without the
/// `basic.nack(requeue)` its other unconfirmed paths send. The declaration's channel error closes
/// the glue's own channel, not the consumer's: the original stays unacked on the consumer's
/// channel, neither acked nor handed back, for as long as that channel lives (its prefetch slot
/// with it), and no copy exists anywhere.
#[tokio::test]
async fn a_failed_declaration_of_a_gone_dead_letter_queue_leaves_the_original_neither_acked_nor_requeued()
 {
    let Some(vhost) = Vhost::new() else { return };
    let conn = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("a connection to the test's vhost");
    let store = MemoryStore::new();
    let queue = unique("idem_rmq_rv2_redeclare");
    let (channel, glue) = fresh_queue(&conn, &queue, QueueKind::Quorum, Policy::default()).await;
    let dlq = glue.topology().dead_letter_queue().to_owned();
    // The dead-letter queue goes away, and the vhost may hold no more queues than it has now (the
    // consumer's queue): the glue's declaration of it again is refused.
    channel
        .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        &vhost.0,
        r#"{"max-queues": 1}"#
    ]));
    publish(&channel, &queue, "poison", b"{}").await;

    let consumer_channel = conn.create_channel().await.unwrap();
    let mut c = consumer(&consumer_channel, &queue).await;
    let d = next_within(&mut c, Duration::from_secs(10))
        .await
        .expect("the message");
    // An empty key: dead-lettered at once.
    let settled = glue.settle(&d, plain(&store, "")).await;
    assert!(settled.is_err(), "{settled:?}");

    // Had the original been nacked with requeue it would be back: ready, or delivered again.
    let again = next_within(&mut c, Duration::from_secs(3)).await;
    let ready_now = ready(&conn, &queue).await;
    let copies = ready(&conn, &dlq).await;
    // It was not acked either: closing the consumer's channel hands it back.
    consumer_channel.close(200, "ok".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready_after_close = ready(&conn, &queue).await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    assert!(
        again.is_some() || ready_now == 1,
        "settle returned {settled:?}, yet the original was neither acked nor requeued: not \
         delivered again within 3 s, {ready_now} ready in the queue, {copies} copies in `{dlq}`; \
         {ready_after_close} ready once the consumer's channel closed (it was held unacked)"
    );
}
