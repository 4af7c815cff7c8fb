//! Operating a store: look at a key, list keys, count them, and let a key run again on purpose,
//! without a stale holder's late mark winning. The `idem` command line is built on this; so can
//! an admin endpoint of yours.
//!
//! The rules every store keeps are on [`Operations`].

use std::time::Duration;

use crate::{Key, StoreError};

/// What a store holds for one key, as an operator sees it. Times are by the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing is kept for the key: its next delivery runs.
    Absent,
    /// A lease holds the key (or held it: `lapsed`, and nobody took it over yet).
    InFlight {
        /// The lease's fence.
        fence: u64,
        /// What is left of the lease (zero once it lapsed).
        lease_left: Duration,
        /// The lease has lapsed: the next delivery takes the key over.
        lapsed: bool,
        /// How long ago the lease was taken, where the store keeps that (the SQL store).
        held_for: Option<Duration>,
        /// Who holds it (`host:pid`), where the store keeps that (the SQL store; the memory
        /// store: this process).
        holder: Option<String>,
    },
    /// Done: duplicates get the stored output.
    Done {
        /// The fence of the lease that completed it, where the store keeps it.
        fence: Option<u64>,
        /// How much longer the record is kept.
        kept_for: Duration,
        /// Whether a payload fingerprint is kept with it (another payload is then refused).
        fingerprint: bool,
        /// The size of the stored output, in bytes.
        output_bytes: u64,
        /// Whether the output can be replayed (not when it was too large or refused).
        replayable: bool,
    },
    /// Free: released after a failure, or forgotten by an operator (`forgotten`); its last fence
    /// is kept, so the next lease's fence is greater.
    Free {
        /// The last fence handed out for the key.
        fence: u64,
        /// Left by [`Operations::forget`] or [`Operations::release_stuck`]: a late mark of the
        /// holder before is refused.
        forgotten: bool,
    },
}

impl KeyState {
    /// A short name of the state: `absent`, `in_flight`, `lapsed`, `done`, `free`, `forgotten`.
    ///
    /// ```
    /// assert_eq!(idem_runtime::KeyState::Absent.name(), "absent");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            KeyState::Absent => "absent",
            KeyState::InFlight { lapsed: false, .. } => "in_flight",
            KeyState::InFlight { lapsed: true, .. } => "lapsed",
            KeyState::Done { .. } => "done",
            KeyState::Free {
                forgotten: false, ..
            } => "free",
            KeyState::Free {
                forgotten: true, ..
            } => "forgotten",
        }
    }
}

/// Which keys [`Operations::list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StateFilter {
    /// Every record.
    #[default]
    All,
    /// Keys held by a lease, live or lapsed (`older_than` applies to these).
    InFlight,
    /// Done keys.
    Done,
}

/// A page of [`Operations::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListQuery {
    /// Which records.
    pub state: StateFilter,
    /// Only leases taken at least this long ago (stores that keep when a lease was taken; the
    /// others list every lease).
    pub older_than: Option<Duration>,
    /// Where the previous page ended ([`Page::next`]); `None` for the first page.
    pub cursor: Option<String>,
    /// The most records a page holds (at least 1), except on Redis, where a page ends with a
    /// whole `SCAN` step and may hold about twice as many. A page may hold fewer and still have
    /// a next one: each page reads a bounded number of records, matching or not.
    pub limit: usize,
}

impl ListQuery {
    /// The first page of up to `limit` records in any state.
    ///
    /// ```
    /// use idem_runtime::{ListQuery, StateFilter};
    /// let q = ListQuery::new(100).state(StateFilter::InFlight);
    /// assert_eq!(q.limit, 100);
    /// ```
    pub fn new(limit: usize) -> Self {
        ListQuery {
            limit: limit.max(1),
            ..ListQuery::default()
        }
    }

    /// Only records in this state.
    pub fn state(mut self, state: StateFilter) -> Self {
        self.state = state;
        self
    }

    /// Only leases taken at least `age` ago.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// Continue after the page that returned `cursor`.
    pub fn after(mut self, cursor: Option<String>) -> Self {
        self.cursor = cursor;
        self
    }
}

/// One record of a [`Page`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listed {
    /// The key as the store keeps it (a key over 200 bytes, or with NUL, as `sha256:<hex>`).
    pub key: String,
    /// Its state.
    pub state: KeyState,
}

/// Records of one scope, and where the next page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// The records, in the store's order.
    pub records: Vec<Listed>,
    /// The cursor of the next page, or `None` after the last one.
    pub next: Option<String>,
}

/// How many records of a scope are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Held by a live lease.
    pub in_flight: u64,
    /// Held by a lease that lapsed (the next delivery takes it over).
    pub lapsed: u64,
    /// Done (within their `keep`).
    pub done: u64,
    /// Free (released, forgotten, or done past their `keep`), kept for their fences.
    pub free: u64,
}

/// What [`Operations::forget`] or [`Operations::release_stuck`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Changed {
    /// The key runs again on its next delivery; the old holder (if any) can no longer mark it
    /// (its fence is below `fence`).
    Freed {
        /// The key's fence now: the next lease's is greater.
        fence: u64,
    },
    /// Nothing to do: the key has no record (or nothing the operation applies to: a free key).
    NotFound,
    /// Refused: the key is in a state the operation does not touch without `force` (a live
    /// lease), or at all (`release_stuck` of a done key: use `forget`).
    Refused {
        /// The key's state, unchanged.
        state: KeyState,
    },
}

/// The operations on a store's records for the people who run it. Implemented by every store
/// of this crate.
///
/// # The rules (`protocol.md`, "Operations")
///
/// - [`inspect`](Operations::inspect), [`list`](Operations::list) and
///   [`counts`](Operations::counts) never change anything.
/// - [`forget`](Operations::forget) makes a done key run again on its next delivery. A key in
///   flight (a live lease) is refused unless forced.
/// - [`release_stuck`](Operations::release_stuck) frees a key in flight whose holder is known to be
///   dead (or stuck), so the next delivery runs. A live lease is refused unless forced; a lapsed
///   one needs no force.
/// - Both leave a *forgotten* record behind, with the key's fence advanced: the next claim gets a
///   greater fence, and a late done mark (or renewal) of the old holder is refused with
///   `LeaseLost` instead of overwriting anything. The record is kept for a day (Redis: the
///   store's fence retention), then purged like any expired row.
/// - On a [`LayeredStore`](crate::LayeredStore) each operation acts on the durable store first,
///   then on the front: since every claim that runs a handler is also a claim in the durable
///   store, a duplicate arriving between the two is answered by the durable record (replayed, or
///   refused as in flight), never let through twice.
///
/// ```
/// use idem_runtime::{Call, Changed, KeyState, MemoryStore, Operations, Options, run};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let opts = Options::new("coupons");
/// let _: Result<u32, idem_runtime::Error> = run(&store, &opts, Call::new("order-1004"), || async { Ok(7) }).await;
/// let key = idem_runtime::Key::new("order-1004").unwrap();
/// assert!(matches!(store.inspect("coupons", &key).await.unwrap(), KeyState::Done { .. }));
/// // A bug was fixed: let order 1004 run again.
/// assert!(matches!(store.forget("coupons", &key, false).await.unwrap(), Changed::Freed { .. }));
/// assert!(matches!(store.inspect("coupons", &key).await.unwrap(), KeyState::Free { forgotten: true, .. }));
/// # });
/// ```
#[async_trait::async_trait]
pub trait Operations: Send + Sync {
    /// The key's state. Changes nothing.
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError>;

    /// A page of the scope's records. Changes nothing; bounded in memory and in the load on the
    /// store per page (Redis: `SCAN`, never `KEYS`; SQL: the primary key's index).
    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError>;

    /// How many of the scope's records are in each state. Changes nothing; reads every record of
    /// the scope (paged), so it takes as long as the scope is large.
    async fn counts(&self, scope: &str) -> Result<Counts, StoreError>;

    /// Let a done key run again on its next delivery. A key held by a live lease is refused
    /// unless `force`; forced, its holder can no longer mark it done.
    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError>;

    /// Free a key held by a lease whose holder is dead or stuck. A live lease is refused unless
    /// `force` (a lapsed one is freed without); a done key is refused (use
    /// [`forget`](Self::forget)). The old holder can no longer mark it done.
    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError>;
}

/// What a forced (or lapsed) change may touch.
// Used by the SQL stores only (memory and Redis keep no holders).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unreachable_pub)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// A done record (`forget`).
    pub(crate) done: bool,
    /// A live lease (`force`).
    pub(crate) live: bool,
}

impl Allowed {
    pub(crate) fn forget(force: bool) -> Allowed {
        Allowed {
            done: true,
            live: force,
        }
    }

    pub(crate) fn release(force: bool) -> Allowed {
        Allowed {
            done: false,
            live: force,
        }
    }

    /// Whether the change applies to a key in `state`; `Err` with the answer otherwise.
    pub(crate) fn check(self, state: KeyState) -> Result<(), Changed> {
        match &state {
            KeyState::Absent | KeyState::Free { .. } => Err(Changed::NotFound),
            KeyState::Done { .. } if !self.done => Err(Changed::Refused { state }),
            KeyState::InFlight { lapsed: false, .. } if !self.live => {
                Err(Changed::Refused { state })
            }
            _ => Ok(()),
        }
    }
}

/// Whether a listed record passes the query's filter.
pub(crate) fn wanted(state: &KeyState, query: &ListQuery) -> bool {
    match (query.state, state) {
        (_, KeyState::Absent) => false,
        (StateFilter::All, _) => true,
        (StateFilter::Done, KeyState::Done { .. }) => true,
        (StateFilter::InFlight, KeyState::InFlight { held_for, .. }) => query
            .older_than
            .is_none_or(|age| held_for.is_none_or(|h| h >= age)),
        _ => false,
    }
}

/// How long a forgotten record is kept (for its fence, and to refuse the old holder's late
/// mark) before purges may delete it.
pub(crate) const FORGOTTEN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// [`holder`] of this process, kept per thread: a claim costs no allocation or system call.
// Used by the SQL stores only (memory and Redis keep no holders).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unreachable_pub)
)]
pub(crate) fn this_holder() -> std::sync::Arc<str> {
    thread_local! {
        static CACHED: std::cell::RefCell<Option<(u32, std::sync::Arc<str>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let pid = super::token_pid();
    CACHED.with_borrow_mut(|cached| match cached {
        Some((p, h)) if *p == pid => h.clone(),
        _ => {
            let h: std::sync::Arc<str> = holder(pid).into();
            *cached = Some((pid, h.clone()));
            h
        }
    })
}

/// Who holds the leases this process takes: `host:pid` (the host from the kernel, or
/// `$HOSTNAME`).
pub(crate) fn holder(pid: u32) -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown-host".to_owned())
    });
    let mut h = String::with_capacity(host.len() + 11);
    h.push_str(host);
    h.push(':');
    h.push_str(&pid.to_string());
    h.truncate(100);
    h
}
