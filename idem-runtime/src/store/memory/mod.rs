//! An in-memory store: the whole contract, for tests and single-process services.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

mod ops;

use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{Fingerprint, Key, StoreError};

const SHARDS: usize = 32;
/// A shard is swept of expired entries when it has grown to twice its size after the last sweep
/// (and at least this size), so sweeping costs O(1) per insert, amortized.
const SWEEP_MIN: usize = 1024;

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
    /// How many callers are in `wait` on this shard: `changed` is only signalled when some are.
    waiting: AtomicUsize,
}

impl Shard {
    fn signal(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

#[derive(Default)]
struct ShardMap {
    entries: HashMap<String, Entry>,
    sweep_at: usize,
}

struct Entry {
    state: State,
    expires: Instant,
    fingerprint: Option<Fingerprint>,
}

enum State {
    InFlight {
        token: Token,
        fence: u64,
        /// When the lease was taken (for `inspect`).
        since: Instant,
    },
    Done {
        token: Token,
        output: Arc<[u8]>,
        fence: u64,
    },
    /// Forgotten by an operator: claimable, and a late mark of the holder before is refused.
    Forgotten { fence: u64 },
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
        // FNV-1a: only spreads load over the shards. The map inside each shard keeps std's
        // keyed SipHash, which is what protects against keys chosen to collide.
        let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.inner.shards[(h as usize) % SHARDS]
    }

    fn begin_at(&self, id: &str, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let shard = self.shard(id);

        let now = Instant::now();
        let mut map = lock(&shard.map);
        if map.entries.len() >= map.sweep_at {
            map.entries.retain(|_, e| e.expires > now);
            map.sweep_at = (map.entries.len() * 2).max(SWEEP_MIN);
        }
        if let Some(e) = map.entries.get_mut(id)
            && e.expires > now
            && !matches!(e.state, State::Forgotten { .. })
        {
            return Ok(match &e.state {
                State::Forgotten { .. } => unreachable!("excluded above"),
                State::InFlight { token, fence, .. } if *token == req.token => {
                    e.expires = after(now, req.ttl);
                    Begin::Acquired(req.lease(*fence))
                }
                State::InFlight { .. } => Begin::InFlight {
                    retry_after: e.expires - now,
                },
                State::Done { .. } if matches!((e.fingerprint, req.fingerprint), (Some(a), Some(b)) if a != b) => {
                    Begin::Mismatch
                }
                State::Done { output, .. } => Begin::Completed {
                    output: output.to_vec(),
                    fingerprint: e.fingerprint,
                },
            });
        }
        let fence = self.inner.fence.fetch_add(1, Ordering::Relaxed) + 1;
        map.entries.insert(
            id.to_owned(),
            Entry {
                state: State::InFlight {
                    token: req.token,
                    fence,
                    since: now,
                },
                expires: after(now, req.ttl),
                fingerprint: req.fingerprint,
            },
        );
        Ok(Begin::Acquired(req.lease(fence)))
    }

    fn complete_at(
        &self,
        id: &str,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let shard = self.shard(id);
        let now = Instant::now();
        let mut map = lock(&shard.map);
        let done = State::Done {
            token: lease.token,
            output: output.into(),
            fence: lease.fence,
        };
        match map.entries.get_mut(id) {
            Some(e) if e.expires > now => match &e.state {
                State::InFlight { token, .. } if *token == lease.token => {
                    e.state = done;
                    e.expires = after(now, keep);
                    e.fingerprint = lease.fingerprint;
                }
                State::Done { token, .. } if *token == lease.token => return Ok(()),
                _ => return Err(StoreError::LeaseLost),
            },
            // Lapsed and not taken over: nobody else owns the key, so record the effect, with the
            // fingerprint the lease was taken with.
            Some(e) => {
                *e = Entry {
                    state: done,
                    expires: after(now, keep),
                    fingerprint: lease.fingerprint,
                }
            }
            None => {
                map.entries.insert(
                    id.to_owned(),
                    Entry {
                        state: done,
                        expires: after(now, keep),
                        fingerprint: lease.fingerprint,
                    },
                );
            }
        }
        drop(map);
        shard.signal();
        Ok(())
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
            shard.signal();
        }
    }
}

/// `now + d`, capped at about a century (as the server stores cap it): `Duration::MAX` is a
/// valid `keep` and `ttl`, and `Instant + Duration::MAX` overflows.
fn after(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now + d.min(CENTURY)
}

fn lock(m: &Mutex<ShardMap>) -> MutexGuard<'_, ShardMap> {
    // A panic while holding the lock cannot leave a map half-updated (each update is one call),
    // so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` with the record's id, built in a reused per-thread buffer: looking a key up allocates
/// nothing (only inserting a new record does). `f` must not call `with_id` again.
fn with_id<R>(scope: &str, key: &Key, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUF.with_borrow_mut(|id| {
        id.clear();
        id.push_str(scope);
        id.push('\0');
        id.push_str(key.as_str());
        f(id)
    })
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
        with_id(req.scope, req.key, |id| self.begin_at(id, req))
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        with_id(scope, key, |id| self.complete_at(id, lease, output, keep))
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        with_id(scope, key, |id| self.remove_if_owned(id, lease));
        Ok(())
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        with_id(scope, key, |id| {
            let now = Instant::now();
            let mut map = lock(&self.shard(id).map);
            match map.entries.get_mut(id) {
                // An expired entry that nobody took over still belongs to its token.
                Some(Entry {
                    state: State::InFlight { token, .. },
                    expires,
                    ..
                }) if *token == lease.token => {
                    *expires = after(now, ttl);
                    Ok(())
                }
                _ => Err(StoreError::LeaseLost),
            }
        })
    }

    fn for_watchdog(&self) -> Arc<dyn Store> {
        // In-process: any thread can call it; a clone shares the records.
        Arc::new(self.clone())
    }

    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        // This one awaits, so it cannot borrow the per-thread buffer: waiting is the slow path.
        let id = record_id(scope, key);
        let shard = self.shard(&id);
        // Counted before registering, so a signaller that sees no waiter cannot miss this one.
        shard.waiting.fetch_add(1, Ordering::SeqCst);
        let _count = WaitingGuard(&shard.waiting);
        let mut changed = pin!(shard.changed.notified());
        // Register before looking, so a change between the look and the await still wakes us.
        changed.as_mut().enable();
        {
            // At once only when the next `begin` would not be told "in flight" by this store: the
            // key is done, or its lease lapsed. A key this store does not hold may be held
            // elsewhere (a layered store's durable layer holds it while the front does not):
            // returning at once would make the waiter ask again in a busy loop.
            let map = lock(&shard.map);
            let settled = matches!(map.entries.get(&id), Some(e) if matches!(e.state, State::Done { .. } | State::Forgotten { .. }) || e.expires <= Instant::now());
            if settled {
                return;
            }
        }
        let _ = tokio::time::timeout(max, changed).await;
    }
}

/// Decrements a shard's waiter count however `wait` ends (including cancellation).
struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
