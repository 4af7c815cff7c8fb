//! The Redis store: the contract of `protocol.md` on Redis (and Redis Cluster), one round trip per
//! phase.
//!
//! # Layout
//!
//! Each record is one string key, `<prefix>{<scope>|<key>}`; a second key with the same hash tag,
//! `<prefix>{<scope>|<key>}:fence`, keeps the last fence of a released lease. Every script
//! touches only these two keys of one slot, so all of them are valid on Redis Cluster. `%`, `{`,
//! `}` and `|` in the scope and the key are percent-escaped, so the tag never ends inside user
//! text and two (scope, key) pairs never share a key. Key text only ever travels in
//! `KEYS`/`ARGV`, never in script source.
//!
//! The record's value is compact binary, written and read whole by the scripts:
//!
//! | state | bytes |
//! |---|---|
//! | in flight | `I`, token (16), fingerprint length (0 or 16), fingerprint, fence (decimal) |
//! | done | `D`, token (16), fingerprint length (0 or 16), fingerprint, output |
//!
//! An in-flight record expires with the lease (`SET … PX ttl`: Redis's clock decides expiry); a
//! done record expires after `keep`. A first call creates one key and writes it twice.
//!
//! # Fences
//!
//! A new lease's fence is Redis's clock in microseconds (`TIME`), raised above the key's last
//! fence where the store still knows it: in the record itself (a retried `begin` gets its fence
//! back) and, after a release, in the `:fence` key, kept for
//! [`RedisStoreBuilder::fence_retention`] (default 24 h). So a lease that follows a release at
//! once still gets a greater fence, and so does one that follows an expired lease or an expired
//! done record, which lie at least a lease ttl or `keep` in the past, unless Redis's clock stepped
//! back by more than that meanwhile. Fences fit in 53 bits (until the year 2255).
//!
//! Why not a counter key per business key (`INCR`): it would be a second key created by every
//! first call, which costs Redis about as much as all the rest of the call, while the clock already
//! orders leases that are separated by a ttl.
//!
//! # Round trips
//!
//! `begin`, `complete`, `release` and `extend` are one `EVALSHA` each. `begin` on a completed key
//! answers with the whole done record, so a duplicate gets its output (and the fingerprint check)
//! in that one reply. When the server has lost its script cache (restart, `SCRIPT FLUSH`, failover)
//! the call is repeated at once as `EVAL`, which also reloads the script, so no call fails for it.
//!
//! # Waiting for an in-flight key
//!
//! A duplicate that waits (`Options::wait`) is woken at once when a holder in the same process
//! completes or releases the key through this store (or a clone); a holder in another process is
//! noticed by the wrapper's next `begin`, after its backoff. Redis is not asked to publish
//! anything, so completions cost nothing extra when nobody waits.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{Key, StoreError};

/// `begin`: claim the key, or answer why not.
///
/// `KEYS`: record, fence key. `ARGV`: token (16 bytes) followed by the fingerprint field (length
/// byte + fingerprint), ttl in ms.
///
/// Replies: integer fence (acquired); `{pttl}` (in flight, alive); the record itself as a bulk
/// string (done, or not a record this script knows: the client decodes it).
const BEGIN: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  if string.byte(v, 1) ~= 73 then return v end
  if string.sub(v, 2, 17) == string.sub(ARGV[1], 1, 16) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(v, 19 + string.byte(v, 18)))
  end
  return {redis.call('PTTL', KEYS[1])}
end
local t = redis.call('TIME')
local f = t[1] * 1000000 + t[2]
local last = tonumber(redis.call('GET', KEYS[2]))
if last and last >= f then f = last + 1 end
redis.call('SET', KEYS[1], 'I' .. ARGV[1] .. string.format('%d', f), 'PX', ARGV[2])
return f
"#;

/// `complete`: mark done if this token holds the key, completed it already (a retry), or nobody
/// holds it (the lease lapsed and was not taken over).
///
/// `KEYS`: record. `ARGV`: token (16 bytes), output, keep in ms.
/// Replies: 1 done, 0 another token holds or completed the key, -1 not a record.
const COMPLETE: &str = r#"
local v = redis.call('GET', KEYS[1])
local fp = '\0'
if v then
  local tag = string.byte(v, 1)
  if (tag ~= 73 and tag ~= 68) or string.len(v) < 18 then return -1 end
  if string.sub(v, 2, 17) ~= ARGV[1] then return 0 end
  if tag == 68 then return 1 end
  fp = string.sub(v, 18, 18 + string.byte(v, 18))
end
redis.call('SET', KEYS[1], 'D' .. ARGV[1] .. fp .. ARGV[2], 'PX', ARGV[3])
return 1
"#;

/// `release`: compare-and-delete of an in-flight record; its fence is kept in the fence key.
///
/// `KEYS`: record, fence key. `ARGV`: `I` + token (17 bytes), fence retention in ms.
/// Reply: 1 deleted, 0 not ours (nothing done).
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], string.sub(v, 19 + string.byte(v, 18)), 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// `extend`: renew an in-flight record this token holds.
///
/// `KEYS`: record. `ARGV`: `I` + token (17 bytes), ttl in ms. Reply: 1 renewed, 0 not ours.
const EXTEND: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

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
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    begin: Script::new(BEGIN),
    complete: Script::new(COMPLETE),
    release: Script::new(RELEASE),
    extend: Script::new(EXTEND),
});

const TAG_DONE: u8 = b'D';
const TAG_IN_FLIGHT: u8 = b'I';
/// Tag + token + fingerprint length.
const HEADER: usize = 18;
/// The longest expiry handed to Redis (about 100 years): longer durations are clamped.
const MAX_EXPIRY_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A connection the [`RedisStore`] sends its scripts on: a [`ConnectionManager`] (reconnects on
/// its own; what [`RedisStore::from_url`] builds), a [`MultiplexedConnection`] (does not
/// reconnect: once the server is gone every call fails, so prefer the manager), or, with the
/// `redis-cluster` feature, a cluster connection. Build it with `.into()` from any of them.
#[derive(Clone)]
pub struct RedisConnection(Conn);

#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl From<ConnectionManager> for RedisConnection {
    fn from(c: ConnectionManager) -> Self {
        RedisConnection(Conn::Manager(c))
    }
}

impl From<MultiplexedConnection> for RedisConnection {
    fn from(c: MultiplexedConnection) -> Self {
        RedisConnection(Conn::Multiplexed(c))
    }
}

#[cfg(feature = "redis-cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
impl From<redis::cluster_async::ClusterConnection> for RedisConnection {
    fn from(c: redis::cluster_async::ClusterConnection) -> Self {
        RedisConnection(Conn::Cluster(c))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Conn::Manager(_) => "RedisConnection::Manager",
            Conn::Multiplexed(_) => "RedisConnection::Multiplexed",
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl RedisConnection {
    async fn send(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let reply = match &self.0 {
            Conn::Manager(c) => c.clone().req_packed_command(cmd).await,
            Conn::Multiplexed(c) => c.clone().req_packed_command(cmd).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.clone().req_packed_command(cmd).await,
        };
        match reply {
            Ok(Value::ServerError(e)) => Err(e.into()),
            r => r,
        }
    }
}

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
    /// Calls of this process waiting for an in-flight key (see [`Store::wait`]).
    waiters: Waiters,
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
/// let manager = client.get_connection_manager().await?;
/// let store = RedisStore::builder(manager).prefix("billing:idem:").build();
/// # let _ = store; Ok(())
/// # }
/// ```
#[derive(Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStoreBuilder {
    conn: RedisConnection,
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

    /// How long the last fence of a released lease is kept (default 24 h; see the module docs on
    /// fences). It is one small key per released business key: handlers that fail often and
    /// have many keys may want less.
    pub fn fence_retention(mut self, retention: Duration) -> Self {
        self.fence_retention = retention;
        self
    }

    /// The store.
    pub fn build(self) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                conn: self.conn,
                waiters: Waiters::default(),
                prefix: self.prefix,
                fence_retention_ms: millis(self.fence_retention),
            }),
        }
    }
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "idem:";
    /// The default time the fence of a released lease is kept.
    pub const DEFAULT_FENCE_RETENTION: Duration = Duration::from_secs(24 * 3600);

    /// A store on an existing connection, with the default prefix.
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

    /// A builder on an existing connection.
    pub fn builder(conn: impl Into<RedisConnection>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            conn: conn.into(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            fence_retention: Self::DEFAULT_FENCE_RETENTION,
        }
    }

    /// Connect to `url` (`redis://host:port/db`, `rediss://` with the `redis-tls` feature) with a
    /// reconnecting [`ConnectionManager`] tuned to fail fast while the server is down (see
    /// [`RedisStore::manager_config`]), and the default prefix.
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
        let manager = client
            .get_connection_manager_with_config(Self::manager_config())
            .await?;
        Ok(Self::new(manager))
    }

    /// The [`ConnectionManager`] settings [`RedisStore::from_url`] uses: responses time out after
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
        let client = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(Duration::from_secs(1))
            .connection_timeout(Duration::from_secs(1))
            .build()?;
        Ok(Self::new(client.get_async_connection().await?))
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of the record of `key` in `scope`, for inspection and tests: with the
    /// default prefix, scope `billing::charge` and key `order-1` it is
    /// `idem:{billing::charge|order-1}`, and its fence key is that plus `:fence`.
    pub fn record_key(&self, scope: &str, key: &Key) -> String {
        let buf = self.keys(scope, key);
        String::from_utf8_lossy(&buf[..buf.len() - FENCE_SUFFIX.len()]).into_owned()
    }

    /// The record key followed by its fence key's suffix: `KEYS[1]` is all but the suffix,
    /// `KEYS[2]` the whole buffer (one allocation for both).
    fn keys(&self, scope: &str, key: &Key) -> Vec<u8> {
        let (scope, key) = (scope.as_bytes(), key.as_str().as_bytes());
        let mut buf = Vec::with_capacity(
            self.inner.prefix.len() + scope.len() + key.len() + 3 + FENCE_SUFFIX.len() + 8,
        );
        buf.extend_from_slice(self.inner.prefix.as_bytes());
        buf.push(b'{');
        push_escaped(&mut buf, scope);
        buf.push(b'|');
        push_escaped(&mut buf, key);
        buf.push(b'}');
        buf.extend_from_slice(FENCE_SUFFIX);
        buf
    }

    /// Run `script` by its SHA; if the server's script cache lost it, run it again at once as
    /// `EVAL` (which also caches it), so the call still succeeds.
    async fn eval(&self, script: &Script, fill: impl Fn(&mut Cmd)) -> Result<Value, RedisError> {
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
    }

    async fn release_by_keys(&self, keys: &[u8], lease: &Lease) -> Result<(), StoreError> {
        let record = &keys[..keys.len() - FENCE_SUFFIX.len()];
        let _wake = Wake(&self.inner.waiters, record);
        let owner = in_flight_prefix(lease.token);
        let retention = self.inner.fence_retention_ms;
        self.eval(&SCRIPTS.release, |c| {
            c.arg(2)
                .arg(record)
                .arg(keys)
                .arg(&owner[..])
                .arg(retention);
        })
        .await
        .map_err(store_error)?;
        Ok(())
    }
}

const FENCE_SUFFIX: &[u8] = b":fence";

fn push_escaped(out: &mut Vec<u8>, text: &[u8]) {
    let special = |b: &u8| matches!(b, b'%' | b'{' | b'|' | b'}');
    if !text.iter().any(special) {
        out.extend_from_slice(text);
        return;
    }
    for &b in text {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b'{' => out.extend_from_slice(b"%7B"),
            b'|' => out.extend_from_slice(b"%7C"),
            b'}' => out.extend_from_slice(b"%7D"),
            _ => out.push(b),
        }
    }
}

fn millis(d: Duration) -> u64 {
    (d.as_millis().min(MAX_EXPIRY_MS as u128) as u64).max(1)
}

fn in_flight_prefix(token: Token) -> [u8; 17] {
    let mut p = [0u8; 17];
    p[0] = TAG_IN_FLIGHT;
    p[1..].copy_from_slice(&token.0.to_be_bytes());
    p
}

fn store_error(e: RedisError) -> StoreError {
    // A key of ours holding another type: someone else wrote there. Everything else
    // (connection, timeout, cluster down, OOM, ...) is unavailability.
    let foreign = e.code() == Some("WRONGTYPE");
    if foreign {
        StoreError::Corrupt(format!("a key of the store holds foreign data: {e}"))
    } else {
        StoreError::Unavailable(Box::new(e))
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("Redis record {what}"))
}

/// Decode a record `begin` answered with: a done record (replay or mismatch), or garbage.
fn decode_done(
    mut record: Vec<u8>,
    fingerprint: Option<crate::Fingerprint>,
) -> Result<Begin, StoreError> {
    if record.first() != Some(&TAG_DONE) {
        return Err(corrupt("has an unknown format"));
    }
    let fp_len = match record.get(HEADER - 1) {
        Some(&n @ (0 | 16)) => n as usize,
        _ => return Err(corrupt("has a bad header")),
    };
    if record.len() < HEADER + fp_len {
        return Err(corrupt("is truncated"));
    }
    if let (16, Some(expected)) = (fp_len, fingerprint)
        && record[HEADER..HEADER + 16] != expected.0
    {
        return Ok(Begin::Mismatch);
    }
    record.drain(..HEADER + fp_len);
    Ok(Begin::Completed { output: record })
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let keys = self.keys(req.scope, req.key);
        let record = &keys[..keys.len() - FENCE_SUFFIX.len()];
        // Token, then the fingerprint field: its length (0 or 16) and the fingerprint.
        let mut claim = [0u8; 33];
        claim[..16].copy_from_slice(&req.token.0.to_be_bytes());
        let claim = match req.fingerprint {
            Some(f) => {
                claim[16] = 16;
                claim[17..].copy_from_slice(&f.0);
                &claim[..]
            }
            None => &claim[..17],
        };
        let ttl = millis(req.ttl);
        let reply = self
            .eval(&SCRIPTS.begin, |c| {
                c.arg(2).arg(record).arg(&keys[..]).arg(claim).arg(ttl);
            })
            .await
            .map_err(store_error)?;
        match reply {
            Value::Int(fence) if fence > 0 => Ok(Begin::Acquired(Lease {
                token: req.token,
                fence: fence as u64,
            })),
            Value::Array(a) => match a.first() {
                Some(&Value::Int(ms)) => Ok(Begin::InFlight {
                    // -1: no expiry (someone persisted the key); report a full ttl.
                    retry_after: if ms < 0 {
                        req.ttl
                    } else {
                        Duration::from_millis(ms.max(1) as u64)
                    },
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
        let keys = self.keys(scope, key);
        let record = &keys[..keys.len() - FENCE_SUFFIX.len()];
        let _wake = Wake(&self.inner.waiters, record);
        let token = lease.token.0.to_be_bytes();
        let keep = millis(keep);
        let reply = self
            .eval(&SCRIPTS.complete, |c| {
                c.arg(1).arg(record).arg(&token[..]).arg(output).arg(keep);
            })
            .await
            .map_err(store_error)?;
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
        self.release_by_keys(&self.keys(scope, key), lease).await
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let keys = self.keys(scope, key);
        let record = &keys[..keys.len() - FENCE_SUFFIX.len()];
        let owner = in_flight_prefix(lease.token);
        let ttl = millis(ttl);
        let reply = self
            .eval(&SCRIPTS.extend, |c| {
                c.arg(1).arg(record).arg(&owner[..]).arg(ttl);
            })
            .await
            .map_err(store_error)?;
        match reply {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::LeaseLost),
            other => Err(StoreError::Corrupt(format!(
                "unexpected Redis reply to extend: {other:?}"
            ))),
        }
    }

    fn release_detached(&self, scope: &str, key: &Key, lease: Lease) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                scope,
                key = %key,
                "cancelled outside a tokio runtime: the key frees when its lease expires"
            );
            return;
        };
        let (store, keys) = (self.clone(), self.keys(scope, key));
        runtime.spawn(async move {
            if let Err(e) = store.release_by_keys(&keys, &lease).await {
                tracing::warn!(error = %e, "background release failed; the key frees when its lease expires");
            }
        });
    }

    /// Returns as soon as a holder in this process completes or releases the key (through this
    /// store or a clone), or after `max`. A holder in another process is seen by the wrapper's
    /// next `begin`, after `max` (its backoff).
    async fn wait(&self, scope: &str, key: &Key, max: Duration) {
        let keys = self.keys(scope, key);
        let record = &keys[..keys.len() - FENCE_SUFFIX.len()];
        let waiter = self.inner.waiters.register(record);
        let notified = waiter.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let _ = tokio::time::timeout(max, notified).await;
    }
}

/// The calls of this process waiting for in-flight keys, by record key. Completing or releasing
/// a key wakes its waiters at once; when nobody waits this costs one atomic load.
#[derive(Default)]
struct Waiters {
    count: std::sync::atomic::AtomicUsize,
    by_key: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Notify>>>,
}

impl Waiters {
    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Notify>>>
    {
        // Each update is one map operation: a panic cannot leave it half-done.
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, record: &[u8]) -> Waiter<'_> {
        let notify = self.map().entry(record.to_vec()).or_default().clone();
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiter {
            waiters: self,
            record: record.to_vec(),
            notify,
        }
    }

    fn wake(&self, record: &[u8]) {
        if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(n) = self.map().get(record) {
            n.notify_waiters();
        }
    }
}

/// One waiting call; unregisters on drop.
struct Waiter<'a> {
    waiters: &'a Waiters,
    record: Vec<u8>,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.waiters
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let mut map = self.waiters.map();
        // The map's handle and ours: we are the last waiter of this key.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.record);
        }
    }
}

/// Wakes a key's waiters when dropped: after the operation, however it ended.
struct Wake<'a>(&'a Waiters, &'a [u8]);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.wake(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_pairs_apart_and_the_tag_closed() {
        let mut a = Vec::new();
        push_escaped(&mut a, b"a|b}{%");
        assert_eq!(a, b"a%7Cb%7D%7B%25");
    }

    #[test]
    fn done_records_decode() {
        let fp = crate::Fingerprint([7; 16]);
        let mut rec = vec![TAG_DONE];
        rec.extend_from_slice(&[1; 16]);
        rec.push(16);
        rec.extend_from_slice(&fp.0);
        rec.extend_from_slice(b"out");
        assert_eq!(
            decode_done(rec.clone(), Some(fp)).unwrap(),
            Begin::Completed {
                output: b"out".to_vec()
            }
        );
        assert_eq!(
            decode_done(rec.clone(), None).unwrap(),
            Begin::Completed {
                output: b"out".to_vec()
            }
        );
        assert_eq!(
            decode_done(rec, Some(crate::Fingerprint([8; 16]))).unwrap(),
            Begin::Mismatch
        );
        assert!(matches!(
            decode_done(b"garbage".to_vec(), None),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            decode_done(b"D123".to_vec(), None),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn expiries_are_clamped() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::MAX), MAX_EXPIRY_MS);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
