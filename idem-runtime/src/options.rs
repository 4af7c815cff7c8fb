//! Per-handler settings.

use std::borrow::Cow;
use std::time::Duration;

/// The settings of one idempotent handler. `#[idempotent]` builds one as a constant; without the
/// macro, build it yourself (every method is `const`):
///
/// ```
/// use idem_runtime::Options;
/// use std::time::Duration;
///
/// const OPTS: Options = Options::new("billing::charge")
///     .ttl(Duration::from_secs(30))
///     .keep(Duration::from_secs(7 * 24 * 3600))
///     .wait(Duration::from_secs(5))
///     .max_output(256 * 1024);
/// assert_eq!(OPTS.scope_str(), "billing::charge");
/// ```
///
/// # The scope is the key space: keep it stable
///
/// Records are found by scope and key. `#[idempotent]` defaults the scope to the function's
/// module path and name (`"app::consumer::issue_coupon"`), so **renaming or moving the function
/// changes its scope** and, after that deploy, every stored record is orphaned: duplicates of
/// work done before it run again. Give the scope explicitly (`scope = "coupons.issue"`) before
/// you rename, set to the old default if records exist, and it stays the same whatever the
/// function is called.
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) scope: Cow<'static, str>,
    pub(crate) ttl: Duration,
    pub(crate) keep: Duration,
    pub(crate) wait: Option<Duration>,
    pub(crate) max_output: usize,
    pub(crate) max_lease: Option<Duration>,
}

impl Options {
    /// Default lease: how long a crashed holder can block its key.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
    /// The shortest lease: a shorter `ttl` is raised to it. A lease of a few milliseconds would
    /// lapse between two renewals and give no exclusion at all.
    pub const MIN_TTL: Duration = Duration::from_millis(100);
    /// Default retention of done records (Stripe and the IETF draft publish at least 24 h).
    pub const DEFAULT_KEEP: Duration = Duration::from_secs(24 * 3600);
    /// The shortest retention: a shorter `keep` is raised to it (a done record that vanished at
    /// once would let every duplicate run).
    pub const MIN_KEEP: Duration = Duration::from_secs(1);
    /// Default bound on a stored output, in bytes once encoded.
    pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
    /// Default longest time a lease is renewed for one handler run.
    pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(3600);

    /// Settings for the handler namespace `scope`, with the defaults: ttl 60 s, keep 24 h,
    /// in-flight duplicates rejected at once, outputs up to 1 MiB stored, leases renewed for up
    /// to 1 h.
    pub const fn new(scope: &'static str) -> Self {
        Options {
            scope: Cow::Borrowed(scope),
            ttl: Self::DEFAULT_TTL,
            keep: Self::DEFAULT_KEEP,
            wait: None,
            max_output: Self::DEFAULT_MAX_OUTPUT,
            max_lease: Some(Self::DEFAULT_MAX_LEASE),
        }
    }

    /// Settings for a scope computed at run time.
    pub fn with_scope(scope: impl Into<String>) -> Self {
        Options {
            scope: Cow::Owned(scope.into()),
            ..Options::new("")
        }
    }

    /// The in-flight lease. It is renewed while the handler runs, so it bounds only how long a
    /// crashed holder blocks the key. At least [`MIN_TTL`](Self::MIN_TTL): a shorter one is raised
    /// to it.
    ///
    /// ```
    /// # use idem_runtime::Options;
    /// # use std::time::Duration;
    /// let o = Options::new("s").ttl(Duration::ZERO);
    /// assert_eq!(o.ttl_duration(), Options::MIN_TTL);
    /// ```
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = if ttl.as_nanos() < Self::MIN_TTL.as_nanos() {
            Self::MIN_TTL
        } else {
            ttl
        };
        self
    }

    /// How long the done record and its replayable output are kept. At least
    /// [`MIN_KEEP`](Self::MIN_KEEP): a shorter one is raised to it.
    pub const fn keep(mut self, keep: Duration) -> Self {
        self.keep = if keep.as_nanos() < Self::MIN_KEEP.as_nanos() {
            Self::MIN_KEEP
        } else {
            keep
        };
        self
    }

    /// Make an in-flight duplicate wait up to `timeout` for the holder to finish, then replay its
    /// output (or run, if the holder failed). Without it, the duplicate gets
    /// [`Error::InFlight`](crate::Error::InFlight) at once.
    ///
    /// In the transactional form the duplicate waits inside its own transaction. On PostgreSQL at
    /// REPEATABLE READ or SERIALIZABLE that transaction's snapshot predates the holder's commit,
    /// so after the wait it gets a serialization failure
    /// ([`Error::Unavailable`](crate::Error::Unavailable), SQLSTATE 40001) instead of the
    /// replay: retry it in a new transaction, which replays. On SQLite it does not wait at all
    /// (its claim holds the database's write lock, which the holder needs): it gets
    /// [`Error::InFlight`](crate::Error::InFlight) at once.
    pub const fn wait(mut self, timeout: Duration) -> Self {
        self.wait = Some(timeout);
        self
    }

    /// The largest output that is stored for replay, in bytes once encoded (default 1 MiB). A
    /// larger output still marks the key done, so the handler never runs twice, but duplicates
    /// get [`Error::Unreplayable`](crate::Error::Unreplayable) instead of the output. The same
    /// happens when the store refuses an output of 64 KiB or more three times while it answers
    /// otherwise (e.g. above MariaDB's `max_allowed_packet`); a store that is down, or a smaller
    /// output, never costs the output.
    pub const fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// The longest a lease is renewed for one run of the handler (default 1 h). A handler that is
    /// still running then (wedged on a lock or a call without a timeout) stops being renewed: its
    /// lease lapses `ttl` later, a duplicate may take the key over with a greater fence, and the
    /// late handler's completion is refused ([`Error::LeaseLost`](crate::Error::LeaseLost)); a
    /// transactional handler's writes then roll back. The handler can see it coming through
    /// [`current_lease`](crate::current_lease).
    pub const fn max_lease(mut self, max: Duration) -> Self {
        self.max_lease = Some(max);
        self
    }

    /// Renew the lease for as long as the handler runs, however long (no [`max_lease`]). A wedged
    /// handler then holds its key until its process dies.
    ///
    /// [`max_lease`]: Self::max_lease
    pub const fn renew_forever(mut self) -> Self {
        self.max_lease = None;
        self
    }

    /// The namespace.
    pub fn scope_str(&self) -> &str {
        &self.scope
    }

    /// The lease length in effect (after clamping).
    pub const fn ttl_duration(&self) -> Duration {
        self.ttl
    }
}
