//! The layer and its settings.

use crate::service::Idempotency;
use http::HeaderName;
use http::request::Parts;
use idem_runtime::{Options, Store};
use std::sync::Arc;
use std::time::Duration;

/// The header a replayed response carries: `Idempotent-Replayed: true`.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// What a stored response may take beside its body (status, headers, trailers).
const HEAD_ROOM: usize = 64 * 1024;

/// Who sent a request, for keys scoped per caller.
type CallerFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// A tower [`Layer`](tower_layer::Layer) that makes the requests of the services it wraps
/// idempotent by their `Idempotency-Key` header (see the [crate docs](crate) for what each
/// request gets).
///
/// ```
/// use idem_http::IdempotencyLayer;
/// use idem_runtime::MemoryStore;
/// use std::time::Duration;
///
/// let layer = IdempotencyLayer::new(MemoryStore::new(), "payments")
///     // Keys of one account never meet another account's.
///     .caller(|req| {
///         req.headers
///             .get("x-account")
///             .and_then(|v| v.to_str().ok())
///             .map(str::to_owned)
///     })
///     .fingerprint_header(http::HeaderName::from_static("x-currency"))
///     .retry_after(Duration::from_secs(2))
///     .keep(Duration::from_secs(24 * 3600));
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) cfg: Arc<Config>,
}

pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) opts: Options,
    pub(crate) header: HeaderName,
    pub(crate) required: bool,
    pub(crate) caller: Option<Arc<CallerFn>>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) retry_after: Duration,
    pub(crate) store_client_errors: bool,
}

impl Clone for Config {
    fn clone(&self) -> Config {
        Config {
            store: self.store.clone(),
            opts: self.opts.clone(),
            header: self.header.clone(),
            required: self.required,
            caller: self.caller.clone(),
            fingerprint_headers: self.fingerprint_headers.clone(),
            max_request_body: self.max_request_body,
            max_response_body: self.max_response_body,
            retry_after: self.retry_after,
            store_client_errors: self.store_client_errors,
        }
    }
}

impl IdempotencyLayer {
    /// The default limit of a request body (fingerprinted) and of a response body (stored): 1 MiB.
    pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
    /// The longest key accepted (the IETF draft leaves it to the server; Stripe's is 255).
    pub const MAX_KEY_LEN: usize = 255;

    /// A layer over `store` whose keys live in `scope` (a namespace of its own: two services on
    /// one store give two scopes). Defaults: the `Idempotency-Key` header, required; the
    /// lease (`ttl`) 60 s, renewed while the handler runs; responses kept 24 h; an in-flight
    /// duplicate answered at once with 409 and `Retry-After: 1`; bodies up to 1 MiB; 2xx and
    /// 3xx responses stored.
    pub fn new(store: impl Store, scope: impl Into<String>) -> IdempotencyLayer {
        IdempotencyLayer {
            cfg: Arc::new(Config {
                store: Arc::new(store),
                // Room for the status and the headers beside a body within the limit.
                opts: Options::with_scope(scope).max_output(Self::DEFAULT_MAX_BODY + HEAD_ROOM),
                header: HeaderName::from_static("idempotency-key"),
                required: true,
                caller: None,
                fingerprint_headers: Vec::new(),
                max_request_body: Self::DEFAULT_MAX_BODY,
                max_response_body: Self::DEFAULT_MAX_BODY,
                retry_after: Duration::from_secs(1),
                store_client_errors: false,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> IdempotencyLayer {
        change(Arc::make_mut(&mut self.cfg));
        self
    }

    /// Requests without the header pass through to the handler (without it, they get 400).
    pub fn optional(self) -> IdempotencyLayer {
        self.with(|c| c.required = false)
    }

    /// Read the key from `name` instead of `Idempotency-Key`.
    pub fn header(self, name: HeaderName) -> IdempotencyLayer {
        self.with(|c| c.header = name)
    }

    /// Scope keys per caller: `caller` names who sent the request (e.g. the authenticated
    /// account, from a header or an extension your authentication layer set), and a key only
    /// meets the same caller's keys. A request it returns `None` for gets `401` (it would
    /// otherwise share one key space with every other unidentified request): put the
    /// authentication outside this layer, and name anonymous callers yourself if a route
    /// takes them.
    pub fn caller(
        self,
        caller: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> IdempotencyLayer {
        self.with(|c| c.caller = Some(Arc::new(caller)))
    }

    /// Make header `name` part of the payload: the same key with another value of it is 422.
    pub fn fingerprint_header(self, name: HeaderName) -> IdempotencyLayer {
        self.with(|c| c.fingerprint_headers.push(name))
    }

    /// The largest request body accepted (it is read whole, to fingerprint it): larger is 413,
    /// before anything is claimed.
    pub fn max_request_body(self, bytes: usize) -> IdempotencyLayer {
        self.with(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored for replay. A larger response still reaches its client
    /// whole and completes the key (the handler never runs twice), but a retry gets 410.
    pub fn max_response_body(self, bytes: usize) -> IdempotencyLayer {
        self.with(|c| {
            c.max_response_body = bytes;
            c.opts = c.opts.clone().max_output(bytes.saturating_add(HEAD_ROOM));
        })
    }

    /// The `Retry-After` of a 409 (a request with this key is in flight) and of a 503: how long
    /// your requests take, not the lease left. Default 1 s; sent in whole seconds, at least 1.
    pub fn retry_after(self, after: Duration) -> IdempotencyLayer {
        self.with(|c| c.retry_after = after)
    }

    /// Store 4xx responses too, as Stripe does (except 408, 409 and 429, which say "try again"):
    /// a retry of a request that failed validation gets the same 4xx without running again.
    pub fn store_client_errors(self, store: bool) -> IdempotencyLayer {
        self.with(|c| c.store_client_errors = store)
    }

    /// The in-flight lease: how long a crashed server's claim blocks the key (renewed while
    /// the handler runs). Default 60 s.
    pub fn ttl(self, ttl: Duration) -> IdempotencyLayer {
        self.with(|c| c.opts = c.opts.clone().ttl(ttl))
    }

    /// The longest a request's lease is renewed while its handler runs and its response is
    /// streamed (default 1 h): a longer stream loses its key to a retry.
    pub fn max_lease(self, max: Duration) -> IdempotencyLayer {
        self.with(|c| c.opts = c.opts.clone().max_lease(max))
    }

    /// How long a completed key's response is kept (default 24 h, the IETF draft's and Stripe's).
    pub fn keep(self, keep: Duration) -> IdempotencyLayer {
        self.with(|c| c.opts = c.opts.clone().keep(keep))
    }

    /// Make a request whose key is in flight wait up to `timeout` for the first one, then get
    /// its response (or run, if the first one failed), instead of 409 at once.
    pub fn wait(self, timeout: Duration) -> IdempotencyLayer {
        self.with(|c| c.opts = c.opts.clone().wait(timeout))
    }
}

impl Config {
    /// Whether a response with `status` is stored for replay (else the key is released).
    pub(crate) fn stores(&self, status: http::StatusCode) -> bool {
        let code = status.as_u16();
        match code {
            200..=399 => true,
            408 | 409 | 429 => false,
            400..=499 => self.store_client_errors,
            _ => false,
        }
    }
}

impl<S> tower_layer::Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}
