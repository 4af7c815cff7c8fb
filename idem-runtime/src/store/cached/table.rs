//! The cached records: sharded, bounded in count and bytes, oldest out first.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

use std::time::Duration;

use crate::store::{Begin, Token};
use crate::{Fingerprint, Key};

const SHARDS: usize = 16;

/// Records of a key, one per scope (almost always one).
type Scoped = Vec<(Box<str>, Entry)>;

struct Entry {
    /// Matches the entry's place in the shard's eviction order.
    seq: u64,
    output: Box<[u8]>,
    fingerprint: Option<Fingerprint>,
    until: Instant,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Key, Scoped>,
    /// Insertion order, for eviction: (seq, key, scope). Never longer than the shard's capacity,
    /// so neither are the entries.
    order: VecDeque<(u64, Key, Box<str>)>,
    bytes: usize,
    next_seq: u64,
    /// The marks sent and not (yet) taken, by lease token, and until when that matters (the
    /// attempt's `keep` later: a record it wrote has expired by then, and a retry writes a new
    /// one). A retry by the same token changes nothing in the store: its record is the earlier
    /// attempt's (its clock, and its output, which the wrapper's last resort for a large output
    /// changes), so a retry is not cached. Never larger than the shard's capacity.
    marking: HashMap<Token, Instant>,
    /// A mark could not be entered in `marking` (full): until then, no mark of this shard is
    /// cached, as any could be a retry of it.
    untrusted_until: Option<Instant>,
}

pub(super) struct Table {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
    bytes_per_shard: usize,
    /// Bumped by every removal: an insert prepared before it (its `complete` was sent before a
    /// forget) is dropped instead of bringing the forgotten record back.
    epoch: AtomicU64,
    hits: AtomicU64,
}

impl Table {
    /// At most `capacity` records and `max_bytes` of outputs in all: each shard holds its share,
    /// rounded down (fewer shards than [`SHARDS`] when `capacity` is smaller).
    pub(super) fn new(capacity: usize, max_bytes: usize) -> Self {
        let shards = SHARDS.min(capacity).max(1);
        Table {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            per_shard: (capacity / shards).max(1),
            bytes_per_shard: max_bytes / shards,
            epoch: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // A panic never happens while a shard is changed halfway; take it back if one did.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached record as `begin` answers it, when it is live and the request's fingerprint
    /// does not differ from the record's (compared only when both have one, as stores do).
    pub(super) fn get(
        &self,
        scope: &str,
        key: &Key,
        fingerprint: Option<Fingerprint>,
    ) -> Option<Begin> {
        let mut shard = self.shard(key);
        let scoped = shard.map.get_mut(key)?;
        let i = scoped.iter().position(|(s, _)| &**s == scope)?;
        let entry = &scoped[i].1;
        if entry.until <= Instant::now() {
            let (_, gone) = scoped.swap_remove(i);
            let empty = scoped.is_empty();
            if empty {
                shard.map.remove(key);
            }
            shard.bytes -= gone.output.len();
            return None;
        }
        if let (Some(asked), Some(kept)) = (fingerprint, entry.fingerprint)
            && asked != kept
        {
            // The store answers (Mismatch); the cache never decides a refusal.
            return None;
        }
        let answer = Begin::Completed {
            output: entry.output.to_vec(),
            fingerprint: entry.fingerprint,
        };
        drop(shard);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(answer)
    }

    /// Where inserts prepared now stand; pass it to [`Table::insert`].
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Cache a DONE record until `until`, unless a removal happened since `epoch` was read.
    pub(super) fn insert(
        &self,
        epoch: u64,
        scope: &str,
        key: &Key,
        output: &[u8],
        fingerprint: Option<Fingerprint>,
        until: Instant,
    ) {
        let mut guard = self.shard(key);
        if output.len() > self.bytes_per_shard || until <= Instant::now() {
            // Not cached (too large, or over already: it would only push a live record out);
            // nor is the key's record of before (its output or fingerprint is not the store's
            // any more).
            guard.take(scope, key);
            return;
        }
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let shard = &mut *guard;
        let seq = shard.next_seq;
        shard.next_seq += 1;
        let entry = Entry {
            seq,
            output: output.into(),
            fingerprint,
            until,
        };
        shard.bytes += output.len();
        let scoped = shard.map.entry(key.clone()).or_default();
        match scoped.iter_mut().find(|(s, _)| &**s == scope) {
            Some((_, old)) => {
                let old = std::mem::replace(old, entry);
                shard.bytes -= old.output.len();
            }
            None => scoped.push((scope.into(), entry)),
        }
        shard.order.push_back((seq, key.clone(), scope.into()));
        while shard.order.len() > self.per_shard || shard.bytes > self.bytes_per_shard {
            let Some((seq, key, scope)) = shard.order.pop_front() else {
                break;
            };
            shard.evict(seq, &key, &scope);
        }
    }

    /// A mark of `key` by `token` is about to be sent at `sent`, to be kept for `keep`: whether
    /// it is the lease's first attempt through this cache, as far as is known.
    pub(super) fn marking(&self, key: &Key, token: Token, sent: Instant, keep: Duration) -> bool {
        let mut shard = self.shard(key);
        if shard.marking.contains_key(&token) {
            return false;
        }
        if shard.marking.len() >= self.per_shard {
            shard.marking.retain(|_, matters| *matters > sent);
        }
        let matters = super::later(sent, keep);
        if shard.marking.len() >= self.per_shard {
            let until = shard.untrusted_until.map_or(matters, |u| u.max(matters));
            shard.untrusted_until = Some(until);
            return false;
        }
        shard.marking.insert(token, matters);
        true
    }

    /// The mark of `key` by `token` was taken; `first`: what [`Table::marking`] said of it.
    /// Whether to cache it: a first attempt, unless an attempt of this shard could not be
    /// tracked lately (this could be its retry).
    pub(super) fn marked(&self, key: &Key, token: Token, first: bool) -> bool {
        let mut shard = self.shard(key);
        shard.marking.remove(&token);
        if shard.untrusted_until.is_some_and(|u| u > Instant::now()) {
            return false;
        }
        shard.untrusted_until = None;
        first
    }

    /// Drop the key's record without invalidating inserts in progress: a mark this process just
    /// had taken, too large to cache, replaces it.
    pub(super) fn take(&self, scope: &str, key: &Key) {
        self.shard(key).take(scope, key);
    }

    pub(super) fn remove(&self, scope: &str, key: &Key) {
        let mut shard = self.shard(key);
        // Under the shard's lock: an insert of this key either ran before (and is removed now)
        // or runs after and sees the new epoch.
        self.epoch.fetch_add(1, Ordering::AcqRel);
        shard.take(scope, key);
    }

    pub(super) fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            self.epoch.fetch_add(1, Ordering::AcqRel);
            // The marks in progress stay: a retry after the clear still counts from its first.
            let shard = &mut *shard;
            shard.map.clear();
            shard.order.clear();
            shard.bytes = 0;
        }
    }

    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.map.values().map(Vec::len).sum::<usize>()
            })
            .sum()
    }

    pub(super) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Shard {
    /// Drop the key's record of `scope`, if any.
    fn take(&mut self, scope: &str, key: &Key) {
        if let Some(scoped) = self.map.get_mut(key)
            && let Some(i) = scoped.iter().position(|(s, _)| &**s == scope)
        {
            let (_, gone) = scoped.swap_remove(i);
            if scoped.is_empty() {
                self.map.remove(key);
            }
            self.bytes -= gone.output.len();
        }
    }

    /// Drop the entry an eviction-order item stands for, if it is still that one (the key may
    /// have been removed, or cached again since, with a later `seq`).
    fn evict(&mut self, seq: u64, key: &Key, scope: &str) {
        let Some(scoped) = self.map.get_mut(key) else {
            return;
        };
        let Some(i) = scoped
            .iter()
            .position(|(s, e)| &**s == scope && e.seq == seq)
        else {
            return;
        };
        let (_, gone) = scoped.swap_remove(i);
        if scoped.is_empty() {
            self.map.remove(key);
        }
        self.bytes -= gone.output.len();
    }
}
