//! The fingerprint of each lease the layered store handed out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{MAX_TRACKED, SHARDS};
use crate::Fingerprint;
use crate::store::Token;

/// The fingerprint of each lease this store handed out, until it is completed or released, so a
/// front record written later carries it (see the module docs).
/// Token → the fingerprint of its request.
type LeaseMap = HashMap<u128, Option<Fingerprint>>;

pub(super) struct Leases {
    shards: Box<[Mutex<LeaseMap>]>,
    len: AtomicUsize,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
        }
    }
}

impl Leases {
    pub(super) fn shard(&self, token: Token) -> std::sync::MutexGuard<'_, LeaseMap> {
        // The low half of a token is a per-process counter: consecutive leases spread evenly. A
        // panic while holding the lock cannot leave the map half-updated: keep using it.
        self.shards[(token.0 as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn insert(&self, token: Token, fingerprint: Option<Fingerprint>) {
        if self.len.load(Ordering::Relaxed) >= MAX_TRACKED {
            return;
        }
        if self.shard(token).insert(token.0, fingerprint).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Some(fingerprint)` when the lease is known.
    pub(super) fn get(&self, token: Token) -> Option<Option<Fingerprint>> {
        self.shard(token).get(&token.0).copied()
    }

    pub(super) fn take(&self, token: Token) -> Option<Option<Fingerprint>> {
        let taken = self.shard(token).remove(&token.0);
        if taken.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        taken
    }
}
