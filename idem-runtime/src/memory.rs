//! An in-memory store: the whole contract, for tests and single-process services.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{Fingerprint, Key, StoreError};

const SHARDS: usize = 32;
/// Expired entries are swept from a shard after this many claims on it.
const SWEEP_EVERY: u32 = 4096;

/// An in-process store that honours the whole contract of `protocol.md`.
///
/// Records live as long as the process: it deduplicates retries and concurrent duplicates within
/// one process (and makes tests fast), but not across restarts or replicas. Cloning is cheap and
/// clones share the records. In-flight waiters are woken by a signal, not by polling. Time is
/// tokio's clock, so `tokio::time::pause` drives expiry in tests.
///
/// ```
/// let store = idem_runtime::MemoryStore::new();
/// idem_runtime::install_default_store(store.clone()).unwrap();
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

struct Inner {
    shards: Box<[Shard]>,
    /// One counter for all keys: strictly increasing per key is implied, and it survives the
    /// removal of a key's record (a per-key counter would restart at 1).
    fence: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            fence: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct Shard {
    map: Mutex<ShardMap>,
    /// Woken whenever a key of this shard stops being in flight.
    changed: Notify,
}

#[derive(Default)]
struct ShardMap {
    entries: HashMap<String, Entry>,
    claims: u32,
}

struct Entry {
    state: State,
    expires: Instant,
    fingerprint: Option<Fingerprint>,
}

enum State {
    InFlight { token: Token, fence: u64 },
    Done { token: Token, output: Arc<[u8]> },
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of records (in flight or done, not yet swept). For tests and metrics.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(&s.map).entries.len())
            .sum()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: &str) -> &Shard {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(id);
        &self.inner.shards[(h as usize) % SHARDS]
    }

    fn remove_if_owned(&self, id: &str, lease: &Lease) {
        let shard = self.shard(id);
        let mut map = lock(&shard.map);
        if let Some(Entry {
            state: State::InFlight { token, .. },
            ..
        }) = map.entries.get(id)
            && *token == lease.token
        {
            map.entries.remove(id);
            drop(map);
            shard.changed.notify_waiters();
        }
    }
}

fn lock(m: &Mutex<ShardMap>) -> MutexGuard<'_, ShardMap> {
    // A panic while holding the lock cannot leave a map half-updated (each update is one call),
    // so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn record_id(scope: &str, key: &Key) -> String {
    let mut id = String::with_capacity(scope.len() + 1 + key.as_str().len());
    id.push_str(scope);
    id.push('\0');
    id.push_str(key.as_str());
    id
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let id = record_id(req.scope, req.key);
        let shard = self.shard(&id);
        let now = Instant::now();
        let mut map = lock(&shard.map);
        map.claims += 1;
        if map.claims >= SWEEP_EVERY {
            map.claims = 0;
            map.entries.retain(|_, e| e.expires > now);
        }
        if let Some(e) = map.entries.get_mut(&id)
            && e.expires > now
        {
            return Ok(match &e.state {
                State::InFlight { token, fence } if *token == req.token => {
                    e.expires = now + req.ttl;
                    Begin::Acquired(Lease {
                        token: *token,
                        fence: *fence,
                    })
                }
                State::InFlight { .. } => Begin::InFlight {
                    retry_after: e.expires - now,
                },
                State::Done { .. } if matches!((e.fingerprint, req.fingerprint), (Some(a), Some(b)) if a != b) => {
                    Begin::Mismatch
                }
                State::Done { output, .. } => Begin::Completed {
                    output: output.to_vec(),
                },
            });
        }
        let fence = self.inner.fence.fetch_add(1, Ordering::Relaxed) + 1;
        map.entries.insert(
            id,
            Entry {
                state: State::InFlight {
                    token: req.token,
                    fence,
                },
                expires: now + req.ttl,
                fingerprint: req.fingerprint,
            },
        );
        Ok(Begin::Acquired(Lease {
            token: req.token,
            fence,
        }))
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let id = record_id(scope, key);
        let shard = self.shard(&id);
        let now = Instant::now();
        let mut map = lock(&shard.map);
        let fingerprint = match map.entries.get(&id) {
            Some(e) if e.expires > now => match &e.state {
                State::InFlight { token, .. } if *token == lease.token => e.fingerprint,
                State::Done { token, .. } if *token == lease.token => return Ok(()),
                _ => return Err(StoreError::LeaseLost),
            },
            // Lapsed and not taken over: nobody else owns the key, so record the effect.
            _ => None,
        };
        map.entries.insert(
            id,
            Entry {
                state: State::Done {
                    token: lease.token,
                    output: output.into(),
                },
                expires: now + keep,
                fingerprint,
            },
        );
        drop(map);
        shard.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.remove_if_owned(&record_id(scope, key), lease);
        Ok(())
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let id = record_id(scope, key);
        let now = Instant::now();
        let mut map = lock(&self.shard(&id).map);
        match map.entries.get_mut(&id) {
            // An expired entry that nobody took over still belongs to its token.
            Some(Entry {
                state: State::InFlight { token, .. },
                expires,
                ..
            }) if *token == lease.token => {
                *expires = now + ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    fn release_detached(&self, scope: &str, key: &Key, lease: Lease) {
        // Nothing to wait for in memory: release right away.
        self.remove_if_owned(&record_id(scope, key), &lease);
    }

    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        let id = record_id(scope, key);
        let shard = self.shard(&id);
        let mut changed = pin!(shard.changed.notified());
        // Register before looking, so a change between the look and the await still wakes us.
        changed.as_mut().enable();
        {
            let map = lock(&shard.map);
            let busy = matches!(map.entries.get(&id), Some(e) if matches!(e.state, State::InFlight { .. }) && e.expires > Instant::now());
            if !busy {
                return;
            }
        }
        let _ = tokio::time::timeout(max, changed).await;
    }
}
