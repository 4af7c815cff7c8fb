//! The Redis store: the contract of `protocol.md` on Redis (and Redis Cluster), one round trip per
//! phase.
//!
//! # Layout
//!
//! Each record is one string key, `<prefix>{<scope>|<key>}`. Every script touches only that key,
//! so all of them are valid on Redis Cluster. `%`, `{`, `}` and `|` in the scope and the key are
//! percent-escaped, so the tag never ends inside user text and two (scope, key) pairs never share
//! a key. Key text only ever travels in `KEYS`/`ARGV`, never in script source (the scripts are
//! the `.lua` files beside this one).
//!
//! The record's value is compact binary, written and read whole by the scripts:
//!
//! | state | bytes | expires (Redis `PX`) |
//! |---|---|---|
//! | in flight | `I`, token (16), fingerprint length (0 or 16), fingerprint, fence (16 digits), lease end (ms, Redis's clock) | lease end + fence retention |
//! | released | `F`, fence (16 digits) | fence retention |
//! | done | `D`, token (16), fingerprint length (0 or 16), fingerprint, output | `keep` |
//!
//! Whether a lease is alive is decided by Redis's clock (`TIME` inside the scripts), never the
//! client's. A first call writes one key twice.
//!
//! # Fences
//!
//! A new lease's fence is the key's last fence + 1 whenever the store still has it: in an
//! in-flight record (also after its lease lapsed: the record outlives the lease by
//! [`RedisStoreBuilder::fence_retention`], default 24 h) and in a released one (kept as long).
//! That needs no clock, so fences never go backwards while Redis keeps the key's record, whatever
//! its clock does. A key with no record (never used, done and past its `keep`, or lost by Redis:
//! `FLUSHALL`, a restart without persistence, a failover that lost writes) starts from Redis's
//! clock in microseconds (`TIME`), which is above the fences handed out before unless that clock
//! stepped back: **after Redis lost data, fences rest on its clock**. A [`LayeredStore`](crate::LayeredStore)
//! hands out the database's fence instead, which does not depend on Redis. Fences fit in 53 bits
//! (until the year 2255).
//!
//! # Round trips
//!
//! `begin`, `complete`, `release` and `extend` are one `EVALSHA` each. `begin` on a completed key
//! answers with the whole done record, so a duplicate gets its output (and the fingerprint check)
//! in that one reply. When the server has lost its script cache (restart, `SCRIPT FLUSH`, failover)
//! the call is repeated at once as `EVAL`, which also reloads the script, so no call fails for it.
//!
//! # Connections
//!
//! [`RedisStore::from_url`] and [`RedisStore::from_client`] open their connection lazily, on
//! first use: a process that starts while Redis is down builds its store, calls fail closed with
//! [`StoreError::Unavailable`] meanwhile (a [`LayeredStore`](crate::LayeredStore) goes on through
//! its database), and work resumes by itself when Redis is back. Such a store also opens a
//! connection of its own for idem's watchdog thread (lease renewal). A store built on a connection
//! you give ([`RedisStore::new`]) renews through that connection.
//!
//! # Waiting for an in-flight key
//!
//! A duplicate that waits (`Options::wait`) is woken at once when a holder in the same process
//! completes or releases the key through this store (or a clone); a holder in another process is
//! noticed by the wrapper's next `begin`, after its backoff. Redis is not asked to publish
//! anything, so completions cost nothing extra when nobody waits.

mod conn;
mod ops;
mod record;
mod waiters;

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::store::{Begin, BeginRequest, Lease, Store};
use crate::{Key, StoreError};
pub use conn::RedisConnection;
use conn::{Conn, Lazy, Source};
use record::{
    corrupt, decode_done, fingerprint_field, in_flight_prefix, millis, push_escaped, store_error,
};
use waiters::{Waiters, Wake};

struct Script {
    src: &'static str,
    sha: String,
}

impl Script {
    fn new(src: &'static str) -> Self {
        Script {
            src,
            sha: redis::Script::new(src).get_hash().to_owned(),
        }
    }
}

struct Scripts {
    begin: Script,
    complete: Script,
    release: Script,
    extend: Script,
    inspect: Script,
    forget: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    begin: Script::new(include_str!("scripts/begin.lua")),
    complete: Script::new(include_str!("scripts/complete.lua")),
    release: Script::new(include_str!("scripts/release.lua")),
    extend: Script::new(include_str!("scripts/extend.lua")),
    inspect: Script::new(include_str!("scripts/inspect.lua")),
    forget: Script::new(include_str!("scripts/forget.lua")),
});

/// The Redis store: the whole contract of `protocol.md`, each phase one round trip.
///
/// Acquire has `SET NX PX` semantics, release is a Lua compare-and-delete, complete and extend
/// are token-checked in Lua, and the fence strictly increases per key (it survives release and
/// expiry of the record). A duplicate of a completed key gets its output in the one reply of
/// `begin`. Works on a single Redis and, with the `redis-cluster` feature, on Redis
/// Cluster. Cloning is cheap; clones share the connection.
///
/// Errors: an unreachable or failing server is [`StoreError::Unavailable`] (the wrapper fails
/// closed: the handler does not run), a value under one of the store's keys that is not one of
/// its records is [`StoreError::Corrupt`], and a token that no longer holds its key is
/// [`StoreError::LeaseLost`].
///
/// ```no_run
/// use idem_runtime::{RedisStore, idempotent};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error(transparent)]
///     Idem(#[from] idem_runtime::Error),
/// }
///
/// #[idempotent(key = "order_id")]
/// async fn ship(order_id: u64) -> Result<String, AppError> {
///     Ok(format!("parcel-{order_id}"))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
/// idem_runtime::install_default_store(RedisStore::from_url(&url).await?)?;
/// ship(42).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    prefix: String,
    fence_retention_ms: u64,
    /// Calls of this process waiting for an in-flight key (see [`Store::wait`]); shared with the
    /// watchdog's store, whose background marks wake them too.
    waiters: Arc<Waiters>,
    /// How the connection was opened, when the store opened it: to open the watchdog's own.
    source: Option<Source>,
    /// This store for the watchdog's thread (see [`Store::for_watchdog`]), built on first use.
    twin: OnceLock<Arc<dyn Store>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("conn", &self.inner.conn)
            .field("prefix", &self.inner.prefix)
            .field(
                "fence_retention",
                &Duration::from_millis(self.inner.fence_retention_ms),
            )
            .finish()
    }
}

/// Builds a [`RedisStore`] with a key prefix and fence retention of your choice.
///
/// ```no_run
/// use idem_runtime::RedisStore;
/// use idem_runtime::redis;
///
/// # async fn f() -> Result<(), redis::RedisError> {
/// let client = redis::Client::open("redis://127.0.0.1:6379")?;
/// let store = RedisStore::builder_from_client(client)?
///     .prefix("billing:idem:")
///     .build();
/// # let _ = store; Ok(())
/// # }
/// ```
#[derive(Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStoreBuilder {
    conn: RedisConnection,
    source: Option<Source>,
    prefix: String,
    fence_retention: Duration,
}

impl RedisStoreBuilder {
    /// The text every key of the store starts with (default `idem:`). Use one per application or
    /// environment sharing a server. A prefix that contains a `{…}` hash tag puts every record on
    /// that tag's slot (one node of a cluster); without one, records spread over the cluster.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a key's last fence is kept after its lease lapsed or was released (default 24 h;
    /// see the module docs on fences). It keeps a small record per such key: handlers that fail
    /// often and have many keys may want less.
    pub fn fence_retention(mut self, retention: Duration) -> Self {
        self.fence_retention = retention;
        self
    }

    /// The store.
    pub fn build(self) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                conn: self.conn,
                waiters: Arc::default(),
                prefix: self.prefix,
                fence_retention_ms: millis(self.fence_retention),
                source: self.source,
                twin: OnceLock::new(),
            }),
        }
    }
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "idem:";
    /// The default time a key's last fence is kept after its lease lapsed or was released.
    pub const DEFAULT_FENCE_RETENTION: Duration = Duration::from_secs(24 * 3600);

    /// A store on an existing connection, with the default prefix.
    ///
    /// Lease renewals go through this connection too, and its I/O runs on the runtime that opened
    /// it: if that runtime's threads are all blocked, renewals stall and a lease can lapse under a
    /// running handler. [`RedisStore::from_url`], [`RedisStore::from_client`] and
    /// [`RedisStore::builder_from_client`] let the watchdog open a connection of its own instead;
    /// prefer them. (A warning says so once, at the first renewal.)
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let client = idem_runtime::redis::Client::open("redis://127.0.0.1:6379")?;
    /// let store = idem_runtime::RedisStore::new(client.get_connection_manager().await?);
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    pub fn new(conn: impl Into<RedisConnection>) -> Self {
        Self::builder(conn).build()
    }

    /// A builder on an existing connection (renewals share it: see [`RedisStore::new`]).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let client = idem_runtime::redis::Client::open("redis://127.0.0.1:6379")?;
    /// let store = idem_runtime::RedisStore::builder(client.get_connection_manager().await?)
    ///     .prefix("billing:idem:")
    ///     .build();
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    pub fn builder(conn: impl Into<RedisConnection>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            conn: conn.into(),
            source: None,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            fence_retention: Self::DEFAULT_FENCE_RETENTION,
        }
    }

    /// A store on the Redis at `url` (`redis://host:port/db`, `rediss://` with the `redis-tls`
    /// feature) through a reconnecting [`ConnectionManager`](redis::aio::ConnectionManager) tuned to fail fast while the server
    /// is down (see [`RedisStore::manager_config`]), with the default prefix.
    ///
    /// The connection is opened on first use, so this fails only for a URL that does not parse:
    /// a process may start while Redis is down. Until Redis answers, calls fail closed with
    /// [`StoreError::Unavailable`].
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let store = idem_runtime::RedisStore::from_url("redis://127.0.0.1:6379").await?;
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    pub async fn from_url(url: &str) -> Result<Self, RedisError> {
        Self::from_client(redis::Client::open(url)?).await
    }

    /// Like [`RedisStore::from_url`], from a client you configured.
    pub async fn from_client(client: redis::Client) -> Result<Self, RedisError> {
        Self::builder_from_client(client).map(RedisStoreBuilder::build)
    }

    /// A builder on a connection opened lazily from `client` (see [`RedisStore::from_url`]).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let client = idem_runtime::redis::Client::open("redis://127.0.0.1:6379")?;
    /// let store = idem_runtime::RedisStore::builder_from_client(client)?
    ///     .prefix("billing:idem:")
    ///     .build();
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    pub fn builder_from_client(client: redis::Client) -> Result<RedisStoreBuilder, RedisError> {
        let source = Source::Client(client, Self::manager_config());
        Ok(RedisStoreBuilder {
            conn: RedisConnection(Conn::Lazy(Arc::new(Lazy::new(source.clone())))),
            source: Some(source),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            fence_retention: Self::DEFAULT_FENCE_RETENTION,
        })
    }

    /// The [`ConnectionManager`](redis::aio::ConnectionManager) settings [`RedisStore::from_url`] uses: responses time out after
    /// 1 s and, while the server is down, a reconnection gives up after about 0.4 s, so calls fail
    /// closed with [`StoreError::Unavailable`] quickly instead of queueing; the next call tries
    /// again, so work resumes by itself when the server is back.
    pub fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
    }

    /// Connect to a Redis Cluster through any of its nodes.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let store = idem_runtime::RedisStore::from_cluster_urls([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .await?;
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn from_cluster_urls<I, T>(nodes: I) -> Result<Self, RedisError>
    where
        I: IntoIterator<Item = T>,
        T: redis::IntoConnectionInfo,
    {
        Ok(Self::builder_from_cluster_urls(nodes).await?.build())
    }

    /// [`from_cluster_urls`](Self::from_cluster_urls), as a builder: for a key prefix or a fence
    /// retention of your own on a cluster.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), idem_runtime::redis::RedisError> {
    /// let store = idem_runtime::RedisStore::builder_from_cluster_urls(["redis://10.0.0.1:6379"])
    ///     .await?
    ///     .prefix("billing")
    ///     .build();
    /// # let _ = store; Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub async fn builder_from_cluster_urls<I, T>(nodes: I) -> Result<RedisStoreBuilder, RedisError>
    where
        I: IntoIterator<Item = T>,
        T: redis::IntoConnectionInfo,
    {
        let client = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(Duration::from_secs(1))
            .connection_timeout(Duration::from_secs(1))
            .build()?;
        let mut builder = Self::builder(client.get_async_connection().await?);
        builder.source = Some(Source::Cluster(client));
        Ok(builder)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of the record of `key` in `scope`, for inspection and tests: with the
    /// default prefix, scope `billing::charge` and key `order-1` it is
    /// `idem:{billing::charge|order-1}`.
    pub fn record_key(&self, scope: &str, key: &Key) -> String {
        String::from_utf8_lossy(&self.key_of(scope, key)).into_owned()
    }

    fn key_of(&self, scope: &str, key: &Key) -> Vec<u8> {
        let (scope, key) = (scope.as_bytes(), key.as_str().as_bytes());
        let mut buf = Vec::with_capacity(self.inner.prefix.len() + scope.len() + key.len() + 8);
        buf.extend_from_slice(self.inner.prefix.as_bytes());
        buf.push(b'{');
        push_escaped(&mut buf, scope);
        buf.push(b'|');
        push_escaped(&mut buf, key);
        buf.push(b'}');
        buf
    }

    /// Run `script` on `record` by its SHA; if the server's script cache lost it, run it again at
    /// once as `EVAL` (which also caches it), so the call still succeeds.
    async fn eval(
        &self,
        script: &Script,
        record: &[u8],
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let fill = |cmd: &mut Cmd| {
            cmd.arg(1).arg(record);
            for a in args {
                cmd.arg(*a);
            }
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.sha.as_bytes());
        fill(&mut cmd);
        match self.inner.conn.send(&cmd).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                tracing::debug!("Redis script cache was empty: sending the script");
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(script.src.as_bytes());
                fill(&mut cmd);
                self.inner.conn.send(&cmd).await
            }
            r => r,
        }
        .map_err(store_error)
    }

    fn retention(&self) -> String {
        self.inner.fence_retention_ms.to_string()
    }
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let record = self.key_of(req.scope, req.key);
        // Token, then the fingerprint field.
        let mut claim = Vec::with_capacity(33);
        claim.extend_from_slice(&req.token.0.to_be_bytes());
        fingerprint_field(req.fingerprint, &mut claim);
        let ttl = millis(req.ttl).to_string();
        let reply = self
            .eval(
                &SCRIPTS.begin,
                &record,
                &[&claim, ttl.as_bytes(), self.retention().as_bytes()],
            )
            .await?;
        match reply {
            Value::Int(fence) if fence > 0 => Ok(Begin::Acquired(req.lease(fence as u64))),
            Value::Array(a) => match a.first() {
                Some(&Value::Int(ms)) => Ok(Begin::InFlight {
                    retry_after: Duration::from_millis(ms.max(1) as u64),
                }),
                _ => Err(corrupt("answer is malformed")),
            },
            Value::BulkString(record) => decode_done(record, req.fingerprint),
            other => Err(StoreError::Corrupt(format!(
                "unexpected Redis reply to begin: {other:?}"
            ))),
        }
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let record = self.key_of(scope, key);
        let _wake = Wake(&self.inner.waiters, &record);
        let token = lease.token.0.to_be_bytes();
        let keep = millis(keep).to_string();
        let mut fingerprint = Vec::with_capacity(17);
        fingerprint_field(lease.fingerprint, &mut fingerprint);
        let reply = self
            .eval(
                &SCRIPTS.complete,
                &record,
                &[&token, output, keep.as_bytes(), &fingerprint],
            )
            .await?;
        match reply {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::LeaseLost),
            Value::Int(-1) => Err(corrupt("has an unknown format")),
            other => Err(StoreError::Corrupt(format!(
                "unexpected Redis reply to complete: {other:?}"
            ))),
        }
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        let record = self.key_of(scope, key);
        let _wake = Wake(&self.inner.waiters, &record);
        let owner = in_flight_prefix(lease.token);
        self.eval(
            &SCRIPTS.release,
            &record,
            &[&owner, self.retention().as_bytes()],
        )
        .await?;
        Ok(())
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let record = self.key_of(scope, key);
        let owner = in_flight_prefix(lease.token);
        let ttl = millis(ttl).to_string();
        let reply = self
            .eval(
                &SCRIPTS.extend,
                &record,
                &[&owner, ttl.as_bytes(), self.retention().as_bytes()],
            )
            .await?;
        match reply {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::LeaseLost),
            other => Err(StoreError::Corrupt(format!(
                "unexpected Redis reply to extend: {other:?}"
            ))),
        }
    }

    /// Returns as soon as a holder in this process completes or releases the key (through this
    /// store or a clone), or after `max`. A holder in another process is seen by the wrapper's
    /// next `begin`, after `max` (its backoff).
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        let record = self.key_of(scope, key);
        let waiter = self.inner.waiters.register(&record);
        let notified = waiter.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let _ = tokio::time::timeout(max, notified).await;
    }

    /// A store on a connection of its own, opened from the watchdog's thread (when this store
    /// opened its connection itself; one built on your connection renews through it).
    fn for_watchdog(&self) -> Arc<dyn Store> {
        let Some(source) = &self.inner.source else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "RedisStore::new: lease renewals share the application's connection and \
                     runtime; a blocked runtime can cost a lease (use RedisStore::from_url or \
                     builder_from_client)"
                );
            });
            return Arc::new(self.clone());
        };
        self.inner
            .twin
            .get_or_init(|| {
                Arc::new(RedisStore {
                    inner: Arc::new(Inner {
                        conn: RedisConnection(Conn::Lazy(Arc::new(Lazy::new(source.clone())))),
                        prefix: self.inner.prefix.clone(),
                        fence_retention_ms: self.inner.fence_retention_ms,
                        waiters: self.inner.waiters.clone(),
                        source: None,
                        twin: OnceLock::new(),
                    }),
                })
            })
            .clone()
    }
}
