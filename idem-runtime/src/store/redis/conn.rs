//! The connections a Redis store sends its scripts on, including ones opened lazily.

use std::fmt;
use std::sync::Arc;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{Cmd, RedisError, Value};

/// A connection the [`RedisStore`](super::RedisStore) sends its scripts on: a
/// [`ConnectionManager`] (reconnects on its own), a [`MultiplexedConnection`] (does not
/// reconnect: once the server is gone every call fails, so prefer the manager), or, with the
/// `redis-cluster` feature, a cluster connection. Build it with `.into()` from any of them.
/// [`RedisStore::from_url`](super::RedisStore::from_url) opens one lazily, on first use.
#[derive(Clone)]
pub struct RedisConnection(pub(super) Conn);

#[derive(Clone)]
pub(super) enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
    /// Opened on first use, in the runtime of that use (the watchdog's own store).
    Lazy(Arc<Lazy>),
}

/// Where a store's connection comes from, when the store opened it itself: what it needs to open
/// another one for the watchdog's thread.
#[derive(Clone)]
pub(super) enum Source {
    Client(redis::Client, ConnectionManagerConfig),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster::ClusterClient),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Client(..) => "Source::Client",
            #[cfg(feature = "redis-cluster")]
            Source::Cluster(_) => "Source::Cluster",
        })
    }
}

pub(super) struct Lazy {
    source: Source,
    conn: tokio::sync::OnceCell<Conn>,
}

impl Lazy {
    pub(super) fn new(source: Source) -> Self {
        Lazy {
            source,
            conn: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> Result<&Conn, RedisError> {
        self.conn
            .get_or_try_init(|| async {
                Ok(match &self.source {
                    // Connects on first request, and reconnects by itself afterwards.
                    Source::Client(client, config) => Conn::Manager(
                        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
                    ),
                    #[cfg(feature = "redis-cluster")]
                    Source::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
                })
            })
            .await
    }
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
            Conn::Lazy(_) => "RedisConnection::Lazy",
        })
    }
}

impl RedisConnection {
    /// One `SCAN` step over every key matching `pattern`, on a single server or across a
    /// cluster's primaries (one after the other). The cursor is `0` to start; the reply's is `0`
    /// once every node was scanned (a cluster's is `<node>:<cursor>`).
    pub(super) async fn scan(
        &self,
        cursor: &str,
        pattern: &[u8],
        count: usize,
    ) -> Result<(String, Vec<Vec<u8>>), RedisError> {
        let conn = match &self.0 {
            Conn::Lazy(lazy) => lazy.get().await?,
            other => other,
        };
        let step = |c: &str| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(c).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
            cmd
        };
        let parse = |v: Value| -> Result<(String, Vec<Vec<u8>>), RedisError> {
            redis::from_redis_value(v).map_err(RedisError::from)
        };
        match conn {
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let mut c = c.clone();
                let nodes = primaries(&mut c).await?;
                let (mut node, mut at) = match cursor.split_once(':') {
                    Some((n, at)) => (n.parse::<usize>().unwrap_or(0), at.to_owned()),
                    None => (0, "0".to_owned()),
                };
                while let Some((host, port)) = nodes.get(node) {
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    let (next, keys) = parse(c.route_command(step(&at), routing).await?)?;
                    if next != "0" {
                        return Ok((format!("{node}:{next}"), keys));
                    }
                    node += 1;
                    at = "0".to_owned();
                    if !keys.is_empty() {
                        let more = if node < nodes.len() {
                            format!("{node}:0")
                        } else {
                            "0".to_owned()
                        };
                        return Ok((more, keys));
                    }
                }
                Ok(("0".to_owned(), Vec::new()))
            }
            _ => {
                let reply = match conn {
                    Conn::Manager(c) => c.clone().req_packed_command(&step(cursor)).await?,
                    Conn::Multiplexed(c) => c.clone().req_packed_command(&step(cursor)).await?,
                    _ => unreachable!("a lazy connection opens a connection of another kind"),
                };
                parse(reply)
            }
        }
    }

    pub(super) async fn send(&self, cmd: &Cmd) -> Result<Value, RedisError> {
        let conn = match &self.0 {
            Conn::Lazy(lazy) => lazy.get().await?,
            other => other,
        };
        let reply = match conn {
            Conn::Manager(c) => c.clone().req_packed_command(cmd).await,
            Conn::Multiplexed(c) => c.clone().req_packed_command(cmd).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.clone().req_packed_command(cmd).await,
            Conn::Lazy(_) => unreachable!("a lazy connection opens a connection of another kind"),
        };
        match reply {
            Ok(Value::ServerError(e)) => Err(e.into()),
            r => r,
        }
    }
}

/// A cluster's primaries (host, port), in a stable order, from `CLUSTER SLOTS`.
#[cfg(feature = "redis-cluster")]
async fn primaries(
    c: &mut redis::cluster_async::ClusterConnection,
) -> Result<Vec<(String, u16)>, RedisError> {
    let slots: Vec<Value> = redis::from_redis_value(
        c.req_packed_command(&redis::cmd("CLUSTER").arg("SLOTS").clone())
            .await?,
    )
    .map_err(RedisError::from)?;
    let mut nodes: Vec<(String, u16)> = Vec::new();
    for range in slots {
        let Value::Array(parts) = range else { continue };
        if let Some(Value::Array(primary)) = parts.get(2) {
            let host: String = primary
                .first()
                .map(|v| redis::from_redis_value(v.clone()).map_err(RedisError::from))
                .transpose()?
                .unwrap_or_default();
            let port: u16 = primary
                .get(1)
                .map(|v| redis::from_redis_value(v.clone()).map_err(RedisError::from))
                .transpose()?
                .unwrap_or(0);
            if !nodes.contains(&(host.clone(), port)) {
                nodes.push((host, port));
            }
        }
    }
    nodes.sort();
    Ok(nodes)
}
