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
