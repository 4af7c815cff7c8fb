//! The operations on the Redis store's records (see [`Operations`]): one script per key
//! (`inspect.lua`, `forget.lua`), and `SCAN` (never `KEYS`) for lists and counts, across a
//! cluster's primaries too. Redis records do not keep who holds a lease nor since when.

use std::time::Duration;

use redis::Value;

use super::record::{HEADER, TAG_DONE, TAG_IN_FLIGHT, corrupt, push_escaped};
use super::{RedisStore, SCRIPTS};
use crate::store::ops::{
    Allowed, Changed, Counts, KeyState, ListQuery, Listed, Operations, Page, wanted,
};
use crate::{Key, StoreError};

const TAG_FREE: u8 = b'F';
const TAG_FORGOTTEN: u8 = b'X';

/// Records read per `SCAN` step, per record a list page may return.
const SCAN_PER_RECORD: usize = 4;

/// A record as `inspect.lua` returns it: its value, Redis's clock in ms, its time to live in ms.
fn state_of(reply: Value) -> Result<KeyState, StoreError> {
    let Value::Array(parts) = reply else {
        return Err(corrupt("inspection reply is malformed"));
    };
    let mut parts = parts.into_iter();
    let value = match parts.next() {
        Some(Value::BulkString(v)) => v,
        Some(Value::Nil | Value::Boolean(false)) | None => return Ok(KeyState::Absent),
        Some(other) => return Err(StoreError::Corrupt(format!("unexpected record {other:?}"))),
    };
    let now_ms = match parts.next() {
        Some(Value::Array(t)) => {
            let n = |i: usize| -> i64 {
                t.get(i)
                    .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
                    .unwrap_or(0)
            };
            n(0) * 1000 + n(1) / 1000
        }
        _ => return Err(corrupt("inspection reply has no clock")),
    };
    let pttl = match parts.next() {
        Some(Value::Int(ms)) => ms,
        _ => -1,
    };
    let ms = |v: i64| Duration::from_millis(v.max(0).unsigned_abs());
    let digits = |b: &[u8]| -> Result<i64, StoreError> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("has a bad number"))
    };
    match value.first().copied() {
        Some(TAG_IN_FLIGHT) => {
            let n = *value
                .get(HEADER - 1)
                .ok_or_else(|| corrupt("is truncated"))? as usize;
            let fence_at = HEADER + n;
            let fence = digits(
                value
                    .get(fence_at..fence_at + 16)
                    .ok_or_else(|| corrupt("is truncated"))?,
            )?;
            let ends = digits(&value[fence_at + 16..])?;
            Ok(KeyState::InFlight {
                fence: fence as u64,
                lease_left: ms(ends - now_ms),
                lapsed: ends <= now_ms,
                held_for: None,
                holder: None,
            })
        }
        Some(TAG_DONE) => {
            let n = *value
                .get(HEADER - 1)
                .ok_or_else(|| corrupt("is truncated"))? as usize;
            let output = value
                .get(HEADER + n..)
                .ok_or_else(|| corrupt("is truncated"))?;
            Ok(KeyState::Done {
                fence: None,
                kept_for: ms(pttl),
                fingerprint: n == 16,
                output_bytes: output.len() as u64,
                replayable: !crate::codec::is_unreplayable(output),
            })
        }
        Some(tag @ (TAG_FREE | TAG_FORGOTTEN)) => Ok(KeyState::Free {
            fence: digits(value.get(1..17).ok_or_else(|| corrupt("is truncated"))?)? as u64,
            forgotten: tag == TAG_FORGOTTEN,
        }),
        _ => Err(corrupt("has an unknown format")),
    }
}

/// `SCAN`'s `MATCH` pattern with glob characters escaped.
fn glob_escaped(text: &[u8], out: &mut Vec<u8>) {
    for &b in text {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// The key's text of a record's Redis key (`<prefix>{<scope>|<key>}`), unescaped.
fn key_text(record: &[u8], head: usize) -> String {
    let body = &record[head.min(record.len())..record.len().saturating_sub(1)];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'%'
            && let Some(hex) = body.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(hex), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(body[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl RedisStore {
    /// The start of every record key of `scope`, and the `SCAN` pattern matching them.
    fn scope_head(&self, scope: &str) -> (Vec<u8>, Vec<u8>) {
        let mut head = Vec::new();
        head.extend_from_slice(self.inner.prefix.as_bytes());
        head.push(b'{');
        push_escaped(&mut head, scope.as_bytes());
        head.push(b'|');
        let mut pattern = Vec::with_capacity(head.len() + 4);
        glob_escaped(&head, &mut pattern);
        pattern.push(b'*');
        (head, pattern)
    }

    async fn inspect_record(&self, record: &[u8]) -> Result<KeyState, StoreError> {
        state_of(self.eval(&SCRIPTS.inspect, record, &[]).await?)
    }

    async fn change(
        &self,
        scope: &str,
        key: &Key,
        allowed: Allowed,
    ) -> Result<Changed, StoreError> {
        let record = self.key_of(scope, key);
        let reply = self
            .eval(
                &SCRIPTS.forget,
                &record,
                &[
                    if allowed.done { b"1" } else { b"0" },
                    if allowed.live { b"1" } else { b"0" },
                    self.retention().as_bytes(),
                ],
            )
            .await?;
        match reply {
            Value::Int(fence) if fence > 0 => {
                // A duplicate in this process waiting on the key may go on.
                self.inner.waiters.wake(&record);
                Ok(Changed::Freed {
                    fence: fence as u64,
                })
            }
            Value::Int(0) => Ok(Changed::NotFound),
            Value::Int(_) => {
                let state = self.inspect_record(&record).await?;
                Ok(allowed.check(state).err().unwrap_or(Changed::NotFound))
            }
            other => Err(StoreError::Corrupt(format!(
                "unexpected Redis reply to forget: {other:?}"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl Operations for RedisStore {
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        self.inspect_record(&self.key_of(scope, key)).await
    }

    /// Whole `SCAN` steps (of `limit` keys asked each) until a page is full, the scan is over, or
    /// `limit` × 4 records were read. The cursor is the next step's `SCAN` cursor (a cluster's:
    /// `<node>:<cursor>`). A step is never split across pages: run again, a step can miss keys
    /// that Redis moved meanwhile (a rehash), so a page holds what its last step matched, which
    /// can be more than `limit` (about one step's worth). `SCAN` may return a record twice.
    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let (head, pattern) = self.scope_head(scope);
        let limit = query.limit.max(1);
        let budget = limit.saturating_mul(SCAN_PER_RECORD);
        // A cursor of an older page format (`<cursor>|<key>`): its step is run again whole
        // (duplicates, never a key missed).
        let mut cursor = match query.cursor.as_deref() {
            Some(c) => c.split_once('|').map_or(c, |(at, _)| at).to_owned(),
            None => "0".to_owned(),
        };
        let (mut records, mut read) = (Vec::new(), 0usize);
        loop {
            let (next, mut keys) = self
                .inner
                .conn
                .scan(&cursor, &pattern, limit)
                .await
                .map_err(super::record::store_error)?;
            keys.sort_unstable();
            read += keys.len();
            for k in keys {
                let text = key_text(&k, head.len());
                let state = self.inspect_record(&k).await?;
                if wanted(&state, query) {
                    records.push(Listed { key: text, state });
                }
            }
            cursor = next;
            if cursor == "0" {
                return Ok(Page {
                    records,
                    next: None,
                });
            }
            if records.len() >= limit || read >= budget {
                return Ok(Page {
                    records,
                    next: Some(cursor),
                });
            }
        }
    }

    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        let (_, pattern) = self.scope_head(scope);
        let mut cursor = "0".to_owned();
        let mut counts = Counts::default();
        loop {
            let (next, keys) = self
                .inner
                .conn
                .scan(&cursor, &pattern, 1000)
                .await
                .map_err(super::record::store_error)?;
            for k in keys {
                match self.inspect_record(&k).await? {
                    KeyState::InFlight { lapsed: false, .. } => counts.in_flight += 1,
                    KeyState::InFlight { lapsed: true, .. } => counts.lapsed += 1,
                    KeyState::Done { .. } => counts.done += 1,
                    KeyState::Absent => {}
                    _ => counts.free += 1,
                }
            }
            if next == "0" {
                return Ok(counts);
            }
            cursor = next;
        }
    }

    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        self.change(scope, key, Allowed::forget(force)).await
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        self.change(scope, key, Allowed::release(force)).await
    }
}
