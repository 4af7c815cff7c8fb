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
///     .wait(Duration::from_secs(5));
/// assert_eq!(OPTS.scope_str(), "billing::charge");
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) scope: Cow<'static, str>,
    pub(crate) ttl: Duration,
    pub(crate) keep: Duration,
    pub(crate) wait: Option<Duration>,
}

impl Options {
    /// Default lease: how long a crashed holder can block its key.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
    /// Default retention of done records (Stripe and the IETF draft publish at least 24 h).
    pub const DEFAULT_KEEP: Duration = Duration::from_secs(24 * 3600);

    /// Settings for the handler namespace `scope`, with the defaults: ttl 60 s, keep 24 h, and
    /// in-flight duplicates rejected at once.
    pub const fn new(scope: &'static str) -> Self {
        Options {
            scope: Cow::Borrowed(scope),
            ttl: Self::DEFAULT_TTL,
            keep: Self::DEFAULT_KEEP,
            wait: None,
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
    /// crashed holder blocks the key.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long the done record and its replayable output are kept.
    pub const fn keep(mut self, keep: Duration) -> Self {
        self.keep = keep;
        self
    }

    /// Make an in-flight duplicate wait up to `timeout` for the holder to finish, then replay its
    /// output (or run, if the holder failed). Without it, the duplicate gets
    /// [`Error::InFlight`](crate::Error::InFlight) at once.
    pub const fn wait(mut self, timeout: Duration) -> Self {
        self.wait = Some(timeout);
        self
    }

    /// The namespace.
    pub fn scope_str(&self) -> &str {
        &self.scope
    }
}
