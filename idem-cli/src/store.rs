//! Opening the store named by a URL.

use std::time::Duration;

use idem_runtime::sqlx;
use idem_runtime::{
    MySqlStore, Operations, PgStore, RedisStore, SqlStore, SqliteStore, StoreError,
};

/// How long connecting to a server may take before the store counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The URL is not one of the supported forms (a mistake of the caller).
    #[error("bad store URL {url:?}: {reason}")]
    BadUrl {
        /// The URL, with any password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--table` is not a plain identifier.
    #[error(transparent)]
    BadTable(#[from] idem_runtime::sql::InvalidTableName),
    /// The server did not answer, or refused the connection.
    #[error("store {url} is unreachable: {source}")]
    Unreachable {
        /// The URL, with any password hidden.
        url: String,
        /// The client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where to find the store, as given on the command line.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `redis://…`, `rediss://…`, `postgres://…`, `mysql://…`, `mariadb://…`, `sqlite://path`.
    pub(crate) url: String,
    /// The SQL stores' table (`None`: the default, `idem_keys`).
    pub(crate) table: Option<String>,
    /// The Redis store's key prefix (`None`: the default, `idem:`).
    pub(crate) prefix: Option<String>,
    /// Create the SQLite file when it does not exist (only `migrate` does).
    pub(crate) create: bool,
}

/// An open store of any kind.
pub(crate) enum AnyStore {
    /// Redis (`RedisStore`).
    Redis(RedisStore),
    /// PostgreSQL.
    Postgres(PgStore),
    /// MySQL or MariaDB.
    MySql(MySqlStore),
    /// SQLite.
    Sqlite(SqliteStore),
}

impl AnyStore {
    /// The store's operations.
    pub(crate) fn ops(&self) -> &dyn Operations {
        match self {
            AnyStore::Redis(s) => s,
            AnyStore::Postgres(s) => s,
            AnyStore::MySql(s) => s,
            AnyStore::Sqlite(s) => s,
        }
    }

    /// Create or upgrade the SQL store's table; `Ok(false)` for Redis, which has no schema.
    pub(crate) async fn migrate(&self) -> Result<bool, StoreError> {
        match self {
            AnyStore::Redis(_) => Ok(false),
            AnyStore::Postgres(s) => s.migrate().await.map(|()| true),
            AnyStore::MySql(s) => s.migrate().await.map(|()| true),
            AnyStore::Sqlite(s) => s.migrate().await.map(|()| true),
        }
    }
}

impl AnyStore {
    /// Delete a SQL store's expired rows, `batch` per statement; how many (`None` for Redis,
    /// whose records expire by themselves).
    pub(crate) async fn purge(&self, batch: u32) -> Result<Option<u64>, StoreError> {
        match self {
            AnyStore::Redis(_) => Ok(None),
            AnyStore::Postgres(s) => s.purge(batch).await.map(Some),
            AnyStore::MySql(s) => s.purge(batch).await.map(Some),
            AnyStore::Sqlite(s) => s.purge(batch).await.map(Some),
        }
    }
}

/// The SQL `migrate` would run on a new database of `target`'s kind (see
/// [`SqlStore::migration_sql`]), without connecting; `None` for Redis, which has no schema.
pub(crate) fn migration_sql(target: &Target) -> Result<Option<String>, OpenError> {
    let bad = |reason: &str| OpenError::BadUrl {
        url: redact_url(&target.url),
        reason: reason.to_owned(),
    };
    let scheme = target.url.split_once(':').map_or("", |(s, _)| s);
    let table = target
        .table
        .as_deref()
        .unwrap_or(idem_runtime::sql::DEFAULT_TABLE);
    let sql = match scheme {
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => return Ok(None),
        "postgres" | "postgresql" => SqlStore::<sqlx::Postgres>::migration_sql(table)?,
        "mysql" | "mariadb" => SqlStore::<sqlx::MySql>::migration_sql(table)?,
        "sqlite" => SqlStore::<sqlx::Sqlite>::migration_sql(table)?,
        _ => {
            return Err(bad(
                "unknown scheme: expected redis://, rediss://, postgres://, mysql://, mariadb:// or sqlite://",
            ));
        }
    };
    Ok(Some(sql))
}

/// The nodes of `redis+cluster://[user[:password]@]host:port[,host:port…]` (`rediss+cluster://`
/// for TLS), each as `redis://[user[:password]@]host:port` (the credentials apply to every node).
pub(crate) fn cluster_nodes(url: &str) -> Result<Vec<String>, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected redis+cluster://host:port[,host:port...]")?;
    let node_scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return Err("expected redis+cluster:// or rediss+cluster://".to_owned()),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    if hosts.contains('/') || hosts.contains('?') {
        return Err(
            "a cluster has no database number or options: host:port[,host:port...]".to_owned(),
        );
    }
    let mut nodes = Vec::new();
    for node in hosts.split(',') {
        let node = node.trim();
        let valid = node
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!("{node:?} is not host:port"));
        }
        nodes.push(format!("{node_scheme}://{auth}{node}"));
    }
    Ok(nodes)
}

/// The URL with the password (if any) replaced by `***`, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Open the store `target` names. Servers are connected to here (within [`CONNECT_TIMEOUT`]),
/// except Redis, whose connection opens on first use.
pub(crate) async fn open(target: &Target) -> Result<AnyStore, OpenError> {
    let url = target.url.as_str();
    let shown = redact_url(url);
    let bad = |reason: &str| OpenError::BadUrl {
        url: shown.clone(),
        reason: reason.to_owned(),
    };
    let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| OpenError::Unreachable {
        url: shown.clone(),
        source: e,
    };
    let Some((scheme, _)) = url.split_once(':') else {
        return Err(bad(
            "expected redis://, rediss://, redis+cluster://, postgres://, mysql://, mariadb:// or sqlite://",
        ));
    };
    match scheme {
        "redis+cluster" | "rediss+cluster" => {
            if target.table.is_some() {
                return Err(bad("--table applies to SQL stores; Redis takes --prefix"));
            }
            let nodes = cluster_nodes(url).map_err(|reason| bad(&reason))?;
            let client = idem_runtime::redis::cluster::ClusterClient::builder(nodes)
                .response_timeout(Duration::from_secs(1))
                .connection_timeout(CONNECT_TIMEOUT)
                .build()
                .map_err(|e| bad(&e.to_string()))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(|e| unreachable(e.into()))?;
            let mut builder = RedisStore::builder(conn);
            if let Some(prefix) = &target.prefix {
                builder = builder.prefix(prefix.clone());
            }
            Ok(AnyStore::Redis(builder.build()))
        }
        "redis" | "rediss" => {
            if target.table.is_some() {
                return Err(bad("--table applies to SQL stores; Redis takes --prefix"));
            }
            let client = idem_runtime::redis::Client::open(url).map_err(|e| bad(&e.to_string()))?;
            let mut builder =
                RedisStore::builder_from_client(client).map_err(|e| bad(&e.to_string()))?;
            if let Some(prefix) = &target.prefix {
                builder = builder.prefix(prefix.clone());
            }
            Ok(AnyStore::Redis(builder.build()))
        }
        "postgres" | "postgresql" => {
            no_prefix(target, &bad)?;
            let options: sqlx::postgres::PgConnectOptions =
                url.parse().map_err(|e: sqlx::Error| bad(&e.to_string()))?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| unreachable(e.into()))?;
            Ok(AnyStore::Postgres(with_table(pool, target)?))
        }
        "mysql" | "mariadb" => {
            no_prefix(target, &bad)?;
            let url = format!("mysql:{}", &url[scheme.len() + 1..]);
            let options: sqlx::mysql::MySqlConnectOptions =
                url.parse().map_err(|e: sqlx::Error| bad(&e.to_string()))?;
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| unreachable(e.into()))?;
            Ok(AnyStore::MySql(with_table(pool, target)?))
        }
        "sqlite" => {
            no_prefix(target, &bad)?;
            let path = url["sqlite:".len()..]
                .strip_prefix("//")
                .unwrap_or(&url["sqlite:".len()..]);
            if path.is_empty() || path.starts_with(":memory:") {
                return Err(bad(
                    "expected sqlite://path/to/file (an in-memory database has no keys to operate on)",
                ));
            }
            if !target.create && !std::path::Path::new(path).exists() {
                return Err(unreachable(
                    format!("no SQLite database at {path} (`idem migrate` creates one)").into(),
                ));
            }
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(target.create)
                .busy_timeout(Duration::from_secs(10));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(2)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| unreachable(e.into()))?;
            Ok(AnyStore::Sqlite(with_table(pool, target)?))
        }
        _ => Err(bad(
            "unknown scheme: expected redis://, rediss://, redis+cluster://, postgres://, mysql://, mariadb:// or sqlite://",
        )),
    }
}

fn no_prefix(target: &Target, bad: &impl Fn(&str) -> OpenError) -> Result<(), OpenError> {
    match target.prefix {
        Some(_) => Err(bad("--prefix applies to Redis; SQL stores take --table")),
        None => Ok(()),
    }
}

fn with_table<DB: idem_runtime::sql::Backend>(
    pool: sqlx::Pool<DB>,
    target: &Target,
) -> Result<SqlStore<DB>, OpenError> {
    Ok(match &target.table {
        Some(table) => SqlStore::with_table(pool, table)?,
        None => SqlStore::new(pool),
    })
}

#[cfg(test)]
mod tests {
    use super::{cluster_nodes, redact_url};

    #[test]
    fn cluster_urls_name_every_node() {
        assert_eq!(
            cluster_nodes("redis+cluster://10.0.0.1:7000,10.0.0.2:7001").unwrap(),
            ["redis://10.0.0.1:7000", "redis://10.0.0.2:7001"]
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://u:pw@a:7000,b:7001/").unwrap(),
            ["rediss://u:pw@a:7000", "rediss://u:pw@b:7001"]
        );
        assert_eq!(
            cluster_nodes("redis+cluster://h:6379").unwrap(),
            ["redis://h:6379"]
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://h",
            "redis+cluster://h:port",
            "redis+cluster://a:1,,b:2",
            "redis+cluster://a:1/0",
            "redis://a:1",
        ] {
            assert!(cluster_nodes(bad).is_err(), "{bad}");
        }
        assert_eq!(
            redact_url("redis+cluster://u:pw@a:7000,b:7001"),
            "redis+cluster://u:***@a:7000,b:7001"
        );
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
