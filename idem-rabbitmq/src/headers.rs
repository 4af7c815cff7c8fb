//! What a delivery carries about its past, and what the glue writes on the copies it publishes.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::topology::long_string;

/// The handler's failures on this message so far (written by the glue on each copy).
pub const FAILURES: &str = "x-idem-failures";
/// How many times this message was deferred because its key was in flight elsewhere, or its run
/// was unsettled (written by the glue on each copy; only spaces the retries, never dead-letters).
pub const DEFERRALS: &str = "x-idem-deferrals";
/// On a dead letter: why, as a label (`DeadLetterReason::as_str`: `mismatch`, `handler_failed`, ...).
pub const REASON: &str = "x-idem-reason";
/// On a dead letter: why, in words (`DeadLetterReason`'s `Display`).
pub const REASON_TEXT: &str = "x-idem-reason-text";
/// On a dead letter: the handler's scope, when an idempotent call reported one.
pub const SCOPE: &str = "x-idem-scope";
/// On a dead letter: the key, redacted (`Key`'s `Display`), when an idempotent call had one.
pub const KEY: &str = "x-idem-key";
/// On a dead letter: the queue it was consumed from.
pub const QUEUE: &str = "x-idem-queue";

/// What the glue reads from a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    /// Handler failures recorded on earlier copies.
    pub failures: u32,
    /// In-flight and unsettled deferrals recorded on earlier copies.
    pub deferrals: u32,
    /// The quorum queue's count of returns of this very copy (a consumer that died or closed its
    /// channel while holding it); 0 on classic queues. Logged, not counted as a failure.
    pub returns: u32,
}

impl Counts {
    pub(crate) fn read(properties: &BasicProperties) -> Counts {
        let Some(headers) = properties.headers() else {
            return Counts::default();
        };
        let get = |name: &str| headers.inner().get(name).and_then(as_u32).unwrap_or(0);
        Counts {
            failures: get(FAILURES),
            deferrals: get(DEFERRALS),
            returns: get("x-delivery-count"),
        }
    }
}

/// Any integer header as a `u32` (clients and brokers pick different integer widths).
fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match *v {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n.into(),
        _ => return None,
    };
    Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// The properties of a copy: the original's, with the broker's per-copy headers removed (they
/// describe the original's trips, and a quorum queue would read a stale `x-delivery-count`),
/// `extra` set, and always persistent (`delivery_mode` 2): once the original is acked the copy
/// is the only one, and a transient message in a classic queue does not survive a restart.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    keep_death: bool,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut headers: BTreeMap<ShortString, AMQPValue> = original
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    headers.retain(|name, _| {
        let name = name.as_str();
        name != "x-delivery-count"
            && (keep_death
                || !(name == "x-death"
                    || name.starts_with("x-first-death-")
                    || name.starts_with("x-last-death-")))
    });
    for (name, value) in extra {
        headers.insert((*name).into(), value.clone());
    }
    original
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(PERSISTENT)
}

/// AMQP's `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

pub(crate) fn count(n: u32) -> AMQPValue {
    AMQPValue::LongLongInt(n.into())
}

pub(crate) fn text(s: &str) -> AMQPValue {
    long_string(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_any_integer_width_and_default_to_zero() {
        let mut h = FieldTable::default();
        h.insert(FAILURES.into(), AMQPValue::LongLongInt(3));
        h.insert(DEFERRALS.into(), AMQPValue::ShortShortUInt(2));
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(-1));
        let c = Counts::read(&BasicProperties::default().with_headers(h));
        assert_eq!(
            c,
            Counts {
                failures: 3,
                deferrals: 2,
                returns: 0
            }
        );
        assert_eq!(Counts::read(&BasicProperties::default()), Counts::default());
    }

    #[test]
    fn copies_drop_the_brokers_per_copy_headers_and_keep_the_rest() {
        let mut h = FieldTable::default();
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(4));
        h.insert("x-death".into(), AMQPValue::LongInt(1));
        h.insert("order".into(), text("7"));
        let original = BasicProperties::default()
            .with_headers(h)
            .with_message_id("m-1".into());
        let copy = copy_properties(&original, false, &[(FAILURES, count(1))]);
        let headers = copy.headers().clone().unwrap();
        let names: Vec<_> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["order", FAILURES]);
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(*copy.delivery_mode(), Some(PERSISTENT));
        let dead = copy_properties(&original, true, &[]);
        assert!(dead.headers().as_ref().unwrap().contains_key("x-death"));
    }
}
