//! The SQL store: one table with a unique key on `(scope, key)`, on PostgreSQL, MySQL/MariaDB and
//! SQLite through sqlx (features `postgres`, `mysql`, `sqlite`).
//!
//! # What it gives
//!
//! [`SqlStore`] honours the whole contract of `protocol.md` (it passes the conformance suite on
//! all three databases). It is the durable truth: the second claim of a key hits the table's
//! primary key, and a record survives restarts and failovers as well as the database does.
//!
//! Two ways to use it:
//!
//! - **As a [`Store`]** (`run`, `#[idempotent]`): the lease, the done mark and the replayed output
//!   live in the table; the handler's effect is wherever the handler puts it. A crash after the
//!   effect but before the done mark leaves the key in flight until its lease expires, and the
//!   redelivery then runs the handler again: *at least once* for the effect, *at most once at a
//!   time*, replay after success.
//! - **Transactional** (`#[idempotent(tx = "tx")]`, [`SqlStore::run_in_tx`]): for handlers whose
//!   effect is a write to the same database. The handler gets a transaction, and the done mark is
//!   written **in that transaction**: the effect and the mark commit together or not at all. A
//!   crash at any point, followed by redelivery, ends with the effect applied *exactly once*; a
//!   holder that lost its claim cannot commit (its mark fails and idem rolls the handler's
//!   writes back to a savepoint taken before it ran). How the claim is held per database, who commits, and what a rollback does: see
//!   [`TxConnection`](crate::TxConnection) and the transactional form's docs on
//!   [`idempotent`](crate::idempotent).
//!
//! # Features and connections
//!
//! `postgres`, `mysql` (MySQL and MariaDB) and `sqlite` (bundled SQLite) each enable sqlx's
//! driver with the tokio runtime; [`sqlx`] is re-exported. No TLS backend is chosen
//! for you: add one to your own `sqlx` dependency (e.g. `features = ["tls-rustls"]`) and cargo
//! unifies the features. Bring your own [`Pool`] (its size, timeouts, and SQLite's WAL mode and
//! `busy_timeout` are yours to set).
//!
//! The transactional form also takes PostgreSQL transactions of other libraries than idem's sqlx
//! 0.9, on a `SqlStore<Postgres>`: sqlx 0.8's (feature `sqlx-0-8`), tokio-postgres's (feature
//! `tokio-postgres`), or any [`PgTransaction`](crate::PgTransaction).
//!
//! # Schema and migrations
//!
//! [`SqlStore::migrate`] creates the table (default [`DEFAULT_TABLE`], `idem_keys`) from the SQL
//! files the crate ships (`idem-runtime/migrations/{postgres,mysql,sqlite}/`), and records the
//! versions it applied in `<table>_migrations`. Call it at start-up; it is idempotent and safe to
//! run from several processes at once (a lock serialises them). One row per key:
//!
//! | column | meaning |
//! |---|---|
//! | `scope`, `idem_key` | the primary key (binary, case- and space-sensitive; scopes over 200 bytes are stored as their SHA-256) |
//! | `state` | 0 free (released), 1 in flight, 2 done |
//! | `token` | the lease token of the holder, or of the caller that completed the key |
//! | `fence` | the lease's fencing number |
//! | `expires_at` | end of the lease or of the record's retention, in microseconds since 1970 **by the database's clock** |
//! | `fingerprint`, `output` | the payload fingerprint and the stored output of a done key |
//!
//! Expiry is decided by the database's clock only (`statement_timestamp()`, `UTC_TIMESTAMP(6)`,
//! `julianday('now')`), never by the client's. Time is kept as integer microseconds so that no
//! session time zone, DST change or 2038 limit can move it.
//!
//! **Fences** are the database clock in microseconds at the claim, or the previous fence + 1 when
//! that is larger: strictly increasing across releases and takeovers (a released row is kept,
//! marked free, not deleted), and across purges as long as the database clock does not step back
//! (a purge deletes a row only once the clock has passed its fence, so the next claim's fence,
//! the clock then, is greater; SQLite's clock has millisecond precision). In the transactional
//! form a claim that rolls back leaves no trace, fence included: the next claim's fence is the
//! clock again, greater than the rolled-back one's unless the database clock stepped back in
//! between (then a fence already handed to a rolled-back handler can come again; a downstream
//! check `fence < $new` then refuses the new holder, which is safe but stalls that key until the
//! clock catches up).
//!
//! # One statement per claim
//!
//! - PostgreSQL: the first call of a key is one statement, which also returns the current record
//!   when the key exists (`WITH claim AS (INSERT ... ON CONFLICT DO NOTHING RETURNING ...)
//!   SELECT ...`): a duplicate of a done key is answered, output included, by that one read-only
//!   statement (no row lock, no WAL flush). Taking over an expired or released lease is a second,
//!   guarded statement (`UPDATE ... WHERE <free, expired, or ours> RETURNING fence`).
//! - SQLite: `begin` reads first (a duplicate needs no write lock, and SQLite has one writer at a
//!   time), then claims with one statement: `INSERT ... ON CONFLICT DO NOTHING RETURNING` for an
//!   absent key, or the guarded `UPDATE ... RETURNING` for a takeover.
//! - MySQL/MariaDB have no `RETURNING` on an upsert, so `begin` reads the record first (a
//!   duplicate of a done key costs that one read-only statement) and then claims with one
//!   conditional statement: an `INSERT` for a free key, or an `UPDATE` guarded by the fence it read
//!   for a takeover (the connection reports matched rows, so the claim is known without reading
//!   again).
//!
//! In every case the claim itself is one atomic statement checked by the primary key; when a
//! concurrent claim changes the row between the read and the write, the write matches nothing and
//! `begin` reads again. `complete` is one `UPDATE` while the lease holds; `release` and `extend`
//! are one `UPDATE` each.
//!
//! # SQLite
//!
//! SQLite has one writer at a time: a long write transaction (in the transactional form, the
//! handler's, which holds the claim from its start) delays every other write, claims of other
//! keys and lease renewals included, up to the pool's `busy_timeout`. Use WAL mode and a
//! `busy_timeout` of several seconds ([`SqliteStore::open`] does both), and keep write
//! transactions short.

//! # Purging
//!
//! Expired rows (released keys, lapsed leases, done records past their `keep`) stay in the table
//! until [`SqlStore::purge`] deletes them, in batches of a bounded size so that no statement holds
//! locks for long. Run it from a scheduler, or spawn [`SqlStore::purge_continuously`].
//!
//! # Behind a Redis front
//!
//! `SqlStore` is a plain [`Store`]: a layered store can hold one and call it as the durable
//! fallback. [`SqlStore::complete_in`] writes the done mark on a connection or transaction the
//! caller owns, which is what a layered transactional mode needs.

#[macro_use]
mod shared;

mod ops;
mod sealed;
mod tx;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg_exec;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::Pool;

use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{Key, StoreError};
use sealed::{At, Claim, Mark, Table};
pub(crate) use shared::*;
pub use tx::TxFuture;
pub(crate) use tx::run_owned;

/// The table name [`SqlStore::new`] uses.
pub const DEFAULT_TABLE: &str = "idem_keys";

/// Table names are at most this long (so that `<table>_migrations` and index names fit every
/// database's identifier limit).
pub const MAX_TABLE_NAME_LEN: usize = 48;

/// A database the SQL store runs on: [`sqlx::Postgres`], [`sqlx::MySql`] (MySQL and MariaDB) or
/// [`sqlx::Sqlite`], each behind its feature. Sealed: the SQL of each database is part of this
/// crate.
pub trait Backend: sealed::Ops + ops::Admin {}

/// An idempotency store in a SQL table. Cheap to clone (the clones share the pool).
///
/// ```no_run
/// use idem_runtime::{Options, Call, run, SqlStore};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// # #[cfg(feature = "postgres")] {
/// let pool = idem_runtime::sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
/// let store = SqlStore::new(pool);
/// store.migrate().await?; // at start-up: creates `idem_keys` if needed
/// tokio::spawn(store.clone().purge_continuously(std::time::Duration::from_secs(300), 1000));
///
/// let opts = Options::new("billing::charge");
/// let receipt: Result<String, idem_runtime::Error> =
///     run(&store, &opts, Call::new("order-42"), || async { Ok("receipt-1".to_string()) }).await;
/// # let _ = receipt;
/// # }
/// # Ok(())
/// # }
/// ```
pub struct SqlStore<DB: Backend> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Backend> {
    pool: Pool<DB>,
    table: Table,
    sql: DB::Sql,
    /// This store for the watchdog's thread (see [`Store::for_watchdog`]), built on first use;
    /// `None`: the watchdog uses this store.
    twin: OnceLock<Option<Arc<dyn Store>>>,
    /// This store on a pool of its own, for what the transactional form does outside the
    /// caller's transaction (MySQL/MariaDB's claim and release), built on first use: the caller's
    /// transaction holds a connection of `pool`, which may be its last.
    side: OnceLock<Option<Box<SqlStore<DB>>>>,
    /// This is such a side store: its claims serve transactions whose own row locks they must
    /// not wait for long (a second call of one key in one transaction, on MySQL/MariaDB).
    is_side: bool,
}

impl<DB: Backend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("database", &DB::NAME)
            .field("table", &self.inner.table.qualified)
            .finish_non_exhaustive()
    }
}

/// The store on PostgreSQL.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub type PgStore = SqlStore<sqlx::Postgres>;

/// The store on MySQL or MariaDB.
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub type MySqlStore = SqlStore<sqlx::MySql>;

/// The store on SQLite.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

/// A table name that is not a plain identifier (or `schema.table`).
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid table name {0:?}: expected `name` or `schema.name`, each [A-Za-z_][A-Za-z0-9_]*, at most 48 characters in all"
)]
pub struct InvalidTableName(pub String);

impl<DB: Backend> SqlStore<DB> {
    /// A store on `pool`, in the table [`DEFAULT_TABLE`]. Call [`migrate`](Self::migrate) once at
    /// start-up before using it.
    pub fn new(pool: Pool<DB>) -> Self {
        Self::build(
            pool,
            Table::parse(DEFAULT_TABLE).expect("the default is valid"),
        )
    }

    /// A store on `pool` in the table `table` (`name` or `schema.name`; the name is spliced into
    /// SQL, so only plain identifiers are accepted).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// # let _in_runtime = rt.enter();
    /// let pool = idem_runtime::sqlx::SqlitePool::connect_lazy("sqlite::memory:").unwrap();
    /// assert!(idem_runtime::SqlStore::with_table(pool.clone(), "billing_idem").is_ok());
    /// assert!(idem_runtime::SqlStore::with_table(pool, "keys; DROP TABLE users").is_err());
    /// # }
    /// ```
    pub fn with_table(pool: Pool<DB>, table: &str) -> Result<Self, InvalidTableName> {
        Ok(Self::build(pool, Table::parse(table)?))
    }

    fn build(pool: Pool<DB>, table: Table) -> Self {
        Self::build_as(pool, table, false)
    }

    fn build_as(pool: Pool<DB>, table: Table, is_side: bool) -> Self {
        let sql = DB::prepare(&table);
        SqlStore {
            inner: Arc::new(Inner {
                pool,
                table,
                sql,
                twin: OnceLock::new(),
                side: OnceLock::new(),
                is_side,
            }),
        }
    }

    /// This store on a pool of its own with the same settings and size (see `Inner::side`);
    /// `None` for a SQLite database not in a file (no other pool reaches it).
    fn side(&self) -> Option<&SqlStore<DB>> {
        self.inner
            .side
            .get_or_init(|| {
                DB::side_pool(&self.inner.pool)
                    .map(|pool| Box::new(SqlStore::build_as(pool, self.inner.table.clone(), true)))
            })
            .as_deref()
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// The table's name, as given.
    pub fn table(&self) -> &str {
        &self.inner.table.qualified
    }

    /// Create or upgrade the table with the migrations this crate ships. Idempotent, and safe to
    /// call from several processes at once (PostgreSQL: an advisory lock; MySQL/MariaDB:
    /// `GET_LOCK`; SQLite: `BEGIN IMMEDIATE`). Applied versions are recorded in
    /// `<table>_migrations`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        DB::migrate(&self.inner.pool, &self.inner.table)
            .await
            .map_err(db_error)
    }

    /// The SQL that [`migrate`](Self::migrate) runs on a new database, for a DBA to review and
    /// apply by hand (when the application's user may not create tables): the statement creating
    /// `<table>_migrations`, then each migration this crate ships with its comments, followed by
    /// the `INSERT` that records its version, so that a later `migrate` finds it applied and does
    /// nothing. Statements end with `;` at the end of a line. On a database already at some
    /// version, apply only the sections after the versions `<table>_migrations` holds. Connects
    /// to nothing.
    ///
    /// ```
    /// # #[cfg(feature = "postgres")] {
    /// use idem_runtime::{SqlStore, sqlx::Postgres};
    /// let sql = SqlStore::<Postgres>::migration_sql("billing.idem_keys").unwrap();
    /// assert!(sql.contains("CREATE TABLE IF NOT EXISTS billing.idem_keys ("));
    /// assert!(sql.contains("INSERT INTO billing.idem_keys_migrations (version, name) VALUES (1, "));
    /// assert!(SqlStore::<Postgres>::migration_sql("keys; DROP TABLE users").is_err());
    /// # }
    /// ```
    pub fn migration_sql(table: &str) -> Result<String, InvalidTableName> {
        let t = Table::parse(table)?;
        let mut out = format!("{};\n", t.fill(DB::MIGRATIONS_TABLE, DB::NOW).as_str());
        for &(version, name, sql) in DB::MIGRATIONS {
            out.push_str(&format!("\n-- version {version}: {name}\n"));
            for line in sql.trim_end().lines() {
                // Comments as shipped (they name the placeholders); statements filled in.
                if line.trim_start().starts_with("--") {
                    out.push_str(line);
                } else {
                    out.push_str(t.fill(line, DB::NOW).as_str());
                }
                out.push('\n');
            }
            out.push_str(
                t.fill(
                    &format!(
                        "INSERT INTO {{table}}_migrations (version, name) VALUES ({version}, '{}');\n",
                        name.replace('\'', "''")
                    ),
                    DB::NOW,
                )
                .as_str(),
            );
        }
        Ok(out)
    }

    /// Delete expired rows (released keys, lapsed leases, done records past their `keep`), at most
    /// `batch_size` rows per statement, until a batch finds fewer; returns how many were deleted.
    /// Each batch is its own short statement, so the table stays available meanwhile. Rows in use
    /// are never deleted: only rows whose expiry has passed by the database's clock.
    pub async fn purge(&self, batch_size: u32) -> Result<u64, StoreError> {
        let batch = batch_size.max(1);
        let mut total = 0;
        loop {
            let mut conn = self.acquire().await?;
            let n = DB::purge_batch(&mut conn, &self.inner.sql, batch.into()).await?;
            drop(conn);
            total += n;
            if n < u64::from(batch) {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Purge every `period`, forever (spawn it). Errors are logged and the next round tries again.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlite")]
    /// # async fn demo(store: idem_runtime::SqliteStore) {
    /// tokio::spawn(store.clone().purge_continuously(std::time::Duration::from_secs(60), 500));
    /// # }
    /// ```
    pub async fn purge_continuously(self, period: Duration, batch_size: u32) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.purge(batch_size).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    table = self.table(),
                    purged = n,
                    "purged expired idempotency records"
                ),
                Err(e) => {
                    tracing::warn!(table = self.table(), error = %e, "purging expired idempotency records failed")
                }
            }
        }
    }

    /// Write the done mark of `lease` on a connection (or transaction: pass `&mut *tx`) that the
    /// caller owns, with the semantics of [`Store::complete`]. Used inside a transaction, the mark
    /// commits or rolls back with it; its row lock makes a concurrent duplicate wait for the
    /// outcome. The transactional form does this for you.
    pub async fn complete_in(
        &self,
        conn: &mut DB::Connection,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let scope = stored_scope(scope);
        let mark = Mark {
            at: At {
                scope: &scope,
                key: key.as_str(),
            },
            token: lease.token,
            fingerprint: lease.fingerprint.map(|f| f.0),
            output,
            keep_us: micros(keep),
            in_tx: false,
        };
        DB::complete(conn, &self.inner.sql, &mark).await
    }

    /// Release `lease` on a connection the caller owns (see [`Store::release`]).
    async fn release_on(
        &self,
        conn: &mut DB::Connection,
        scope: &str,
        key: &Key,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        let scope = stored_scope(scope);
        let at = At {
            scope: &scope,
            key: key.as_str(),
        };
        DB::release(conn, &self.inner.sql, &at, lease.token).await
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, StoreError> {
        self.inner.pool.acquire().await.map_err(db_error)
    }
}

#[async_trait::async_trait]
impl<DB: Backend> Store for SqlStore<DB> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let scope = stored_scope(req.scope);
        let holder = crate::store::ops::this_holder();
        let claim = Claim {
            at: At {
                scope: &scope,
                key: req.key.as_str(),
            },
            token: req.token,
            ttl_us: micros(req.ttl),
            fingerprint: req.fingerprint.map(|f| f.0),
            brief_lock_wait: self.inner.is_side,
            holder: &holder,
        };
        let mut conn = self.acquire().await?;
        DB::begin(&mut conn, &self.inner.sql, &claim).await
    }

    async fn complete(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.acquire().await?;
        self.complete_in(&mut conn, scope, key, lease, output, keep)
            .await
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.acquire().await?;
        self.release_on(&mut conn, scope, key, lease).await
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let scope = stored_scope(scope);
        let at = At {
            scope: &scope,
            key: key.as_str(),
        };
        let mut conn = self.acquire().await?;
        DB::extend(&mut conn, &self.inner.sql, &at, lease.token, micros(ttl)).await
    }

    /// A store on the same table through a small pool of its own with the same settings, whose
    /// connections are opened from the watchdog's thread (a SQLite database not in a file: this
    /// store).
    fn for_watchdog(&self) -> Arc<dyn Store> {
        let twin = self.inner.twin.get_or_init(|| {
            DB::watchdog_pool(&self.inner.pool)
                .map(|pool| Arc::new(SqlStore::build(pool, self.inner.table.clone())) as _)
        });
        match twin {
            Some(twin) => twin.clone(),
            // Not kept: a clone kept inside the store would keep the store alive forever.
            None => Arc::new(self.clone()),
        }
    }

    fn transactional(&self) -> Option<&dyn TxStore> {
        Some(self)
    }
}
