//! The operations on the memory store's records (see [`Operations`]).

use tokio::time::Instant;

use super::{Entry, MemoryStore, SHARDS, State, lock, record_id};
use crate::store::ops::{
    Allowed, Changed, Counts, FORGOTTEN_RETENTION, KeyState, ListQuery, Listed, Operations, Page,
    holder, wanted,
};
use crate::{Key, StoreError};

impl Entry {
    fn key_state(&self, now: Instant) -> KeyState {
        match &self.state {
            State::InFlight { fence, since, .. } => {
                let lapsed = self.expires <= now;
                KeyState::InFlight {
                    fence: *fence,
                    lease_left: self.expires.saturating_duration_since(now),
                    lapsed,
                    held_for: Some(now.saturating_duration_since(*since)),
                    holder: Some(holder(std::process::id())),
                }
            }
            State::Done { output, fence, .. } if self.expires > now => KeyState::Done {
                fence: Some(*fence),
                kept_for: self.expires - now,
                fingerprint: self.fingerprint.is_some(),
                output_bytes: output.len() as u64,
                replayable: !crate::codec::is_unreplayable(output),
            },
            // Done past its keep: what a begin would see is an absent key.
            State::Done { .. } => KeyState::Absent,
            State::Forgotten { fence } => KeyState::Free {
                fence: *fence,
                forgotten: true,
            },
        }
    }
}

impl MemoryStore {
    fn state_of(&self, id: &str) -> KeyState {
        let now = Instant::now();
        lock(&self.shard(id).map)
            .entries
            .get(id)
            .map_or(KeyState::Absent, |e| e.key_state(now))
    }

    fn forget_as(&self, id: &str, allowed: Allowed) -> Changed {
        let shard = self.shard(id);
        let now = Instant::now();
        let mut map = lock(&shard.map);
        let state = map
            .entries
            .get(id)
            .map_or(KeyState::Absent, |e| e.key_state(now));
        if let Err(answer) = allowed.check(state) {
            return answer;
        }
        // A new fence from the store's counter: greater than every fence handed out before.
        let fence = self
            .inner
            .fence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        map.entries.insert(
            id.to_owned(),
            Entry {
                state: State::Forgotten { fence },
                expires: now + FORGOTTEN_RETENTION,
                fingerprint: None,
            },
        );
        drop(map);
        shard.signal();
        Changed::Freed { fence }
    }
}

#[async_trait::async_trait]
impl Operations for MemoryStore {
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        Ok(self.state_of(&record_id(scope, key)))
    }

    /// Shard by shard; within a shard, by key. The cursor is `<shard>/<last key>`.
    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let prefix = format!("{scope}\0");
        let (mut shard, mut after) = match query.cursor.as_deref().and_then(|c| c.split_once('/')) {
            Some((s, k)) => (
                s.parse::<usize>()
                    .map_err(|_| StoreError::Unsupported(format!("bad cursor {s:?}")))?,
                Some(k.to_owned()),
            ),
            None => (0, None),
        };
        let mut records = Vec::new();
        let now = Instant::now();
        while shard < SHARDS {
            let map = lock(&self.inner.shards[shard].map);
            let mut keys: Vec<(&str, &Entry)> = map
                .entries
                .iter()
                .filter_map(|(id, e)| id.strip_prefix(&prefix).map(|k| (k, e)))
                .filter(|(k, _)| after.as_deref().is_none_or(|a| *k > a))
                .collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, e) in keys {
                let state = e.key_state(now);
                if wanted(&state, query) {
                    records.push(Listed {
                        key: k.to_owned(),
                        state,
                    });
                }
                if records.len() >= query.limit {
                    return Ok(Page {
                        records,
                        next: Some(format!("{shard}/{k}")),
                    });
                }
            }
            drop(map);
            shard += 1;
            after = None;
        }
        Ok(Page {
            records,
            next: None,
        })
    }

    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        let prefix = format!("{scope}\0");
        let now = Instant::now();
        let mut counts = Counts::default();
        for shard in self.inner.shards.iter() {
            let map = lock(&shard.map);
            for (_, e) in map.entries.iter().filter(|(id, _)| id.starts_with(&prefix)) {
                match e.key_state(now) {
                    KeyState::InFlight { lapsed: false, .. } => counts.in_flight += 1,
                    KeyState::InFlight { lapsed: true, .. } => counts.lapsed += 1,
                    KeyState::Done { .. } => counts.done += 1,
                    _ => counts.free += 1,
                }
            }
        }
        Ok(counts)
    }

    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        Ok(self.forget_as(&record_id(scope, key), Allowed::forget(force)))
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        Ok(self.forget_as(&record_id(scope, key), Allowed::release(force)))
    }
}
