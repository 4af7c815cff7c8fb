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
//! - **Transactional** ([`SqlStore::run_in_tx`]): for handlers whose effect is a write to the same
//!   database. The handler gets a transaction, and the done mark is written **in that
//!   transaction**, checked against the lease token: the effect and the mark commit together or
//!   not at all. A crash at any point, followed by redelivery, ends with the effect applied
//!   *exactly once*; a holder whose lease was taken over cannot commit (its mark fails, its
//!   transaction rolls back).
//!
//! # Features and connections
//!
//! `postgres`, `mysql` (MySQL and MariaDB) and `sqlite` (bundled SQLite) each enable sqlx's
//! driver with the tokio runtime; [`sqlx`] is re-exported. No TLS backend is chosen
//! for you: add one to your own `sqlx` dependency (e.g. `features = ["tls-rustls"]`) and cargo
//! unifies the features. Bring your own [`Pool`] (its size, timeouts, and SQLite's WAL mode and
//! `busy_timeout` are yours to set).
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
//! marked free, not deleted), and across purges as long as the database clock does not step back.
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
//! SQLite has one writer at a time: a long write transaction (in [`SqlStore::run_in_tx`], the
//! handler's) delays every other write, lease renewals included, up to the pool's
//! `busy_timeout`. Use WAL mode, a `busy_timeout` of several seconds, and a `ttl` well above your
//! longest write transaction.

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

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{Pool, Transaction};

use crate::codec;
use crate::run::{Marking, execute, store_error};
use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{AbsorbsIdemError, Call, Error, Key, Options, Outcome, Phase, Replayable, StoreError};
use sealed::{At, Claim, Mark, Table};

/// The `Ops` impl of a backend with `RETURNING` (PostgreSQL, SQLite): `complete`, `release`,
/// `extend` and `purge_batch` are the same statements, bound the same way, on both; only the
/// connection type differs. The backend's own items are passed in. Names in the bodies (`Sql`,
/// `unavailable`, `done_by`, ...) resolve in the invoking backend's module.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
macro_rules! returning_ops {
    (impl Ops for $db:ty, $conn:ty { $($items:tt)* }) => {
        #[async_trait::async_trait]
        impl Ops for $db {
        $($items)*
        async fn complete(conn: &mut $conn, sql: &Sql, mark: &Mark<'_>) -> Result<(), StoreError> {
            let token = token_bytes(mark.token);
            let marked = sqlx::query(sql.mark.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .bind(&token[..])
                .bind(mark.keep_us)
                .bind(mark.output)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            if marked.rows_affected() == 1 {
                return Ok(());
            }
            let written = sqlx::query(sql.complete.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .bind(&token[..])
                .bind(mark.keep_us)
                .bind(mark.output)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            if written.is_some() {
                return Ok(());
            }
            let row: Option<(i16, Vec<u8>)> = sqlx::query_as(sql.owner.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            done_by(row, mark.token)
        }

        async fn release(
            conn: &mut $conn,
            sql: &Sql,
            at: &At<'_>,
            token: Token,
        ) -> Result<(), StoreError> {
            sqlx::query(sql.release.clone())
                .bind(at.scope)
                .bind(at.key)
                .bind(&token_bytes(token)[..])
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        }

        async fn extend(
            conn: &mut $conn,
            sql: &Sql,
            at: &At<'_>,
            token: Token,
            ttl_us: i64,
        ) -> Result<(), StoreError> {
            let done = sqlx::query(sql.extend.clone())
                .bind(at.scope)
                .bind(at.key)
                .bind(&token_bytes(token)[..])
                .bind(ttl_us)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            if done.rows_affected() == 1 {
                Ok(())
            } else {
                Err(StoreError::LeaseLost)
            }
        }

        async fn purge_batch(conn: &mut $conn, sql: &Sql, limit: i64) -> Result<u64, StoreError> {
            let done = sqlx::query(sql.purge.clone())
                .bind(limit)
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected())
        }
        }
    };
}

mod sealed;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

/// The table name [`SqlStore::new`] uses.
pub const DEFAULT_TABLE: &str = "idem_keys";

/// Table names are at most this long (so that `<table>_migrations` and index names fit every
/// database's identifier limit).
pub const MAX_TABLE_NAME_LEN: usize = 48;

/// A database the SQL store runs on: [`sqlx::Postgres`], [`sqlx::MySql`] (MySQL and MariaDB) or
/// [`sqlx::Sqlite`], each behind its feature. Sealed: the SQL of each database is part of this
/// crate.
pub trait Backend: sealed::Ops {}

/// The future a transactional handler returns (see [`SqlStore::run_in_tx`]): boxed, because it
/// borrows the transaction it was given.
pub type TxFuture<'t, R> = Pin<Box<dyn Future<Output = R> + Send + 't>>;

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
        let sql = DB::prepare(&table);
        SqlStore {
            inner: Arc::new(Inner { pool, table, sql }),
        }
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
    /// outcome. [`run_in_tx`](Self::run_in_tx) does this for you.
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
            output,
            keep_us: micros(keep),
        };
        DB::complete(conn, &self.inner.sql, &mark).await
    }

    /// Run `handler` at most once per key, **exactly once in effect** for writes it makes in the
    /// transaction it is given: the transactional mode.
    ///
    /// Claims the key like [`run`](crate::run) (replay, in-flight refusal or wait, fingerprint
    /// check: all as `opts` says), then begins a transaction on this store's pool and passes it to
    /// `handler`. On `Ok(v)` the done mark (with `v` for replay) is written in that transaction,
    /// token-checked, and the transaction commits: the handler's writes and the mark commit
    /// together or not at all. On `Err`, a panic or cancellation the transaction rolls back and the
    /// key is released.
    ///
    /// What each outcome means here:
    /// - `Ok(v)`: the effect and the mark committed.
    /// - [`Error::LeaseLost`]: this caller's lease was taken over (its ttl elapsed unrenewed); its
    ///   transaction was rolled back, so its effect did not happen.
    /// - [`Error::Unavailable`] in [`Phase::Complete`]: the mark or the commit failed; the
    ///   transaction was rolled back, unless the commit's reply was lost, in which case the key is
    ///   done and a redelivery replays.
    /// - Crash of the process at any point: the transaction rolls back with the connection; the
    ///   lease expires after `ttl` and the redelivery runs the handler again.
    ///
    /// The lease is claimed outside the transaction (on another pool connection) so that an
    /// in-flight duplicate is answered at once instead of blocking; the pool needs at least two
    /// connections. On SQLite the transaction starts with `BEGIN IMMEDIATE`.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{Call, Options, SqlStore, sqlx};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error(transparent)]
    ///     Idem(#[from] idem_runtime::Error),
    ///     #[error(transparent)]
    ///     Db(#[from] sqlx::Error),
    /// }
    ///
    /// let path = std::env::temp_dir().join(format!("idem-doc-{}.db", std::process::id()));
    /// let url = format!("sqlite://{}?mode=rwc", path.display());
    /// let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    /// sqlx::query("CREATE TABLE IF NOT EXISTS coupons (order_id TEXT, code TEXT)").execute(&pool).await.unwrap();
    /// let store = SqlStore::new(pool);
    /// store.migrate().await.unwrap();
    ///
    /// let opts = Options::new("coupons::issue");
    /// for _delivery in 0..3 {
    ///     let code: Result<String, AppError> = store
    ///         .run_in_tx(&opts, Call::new("order-7"), |tx| Box::pin(async move {
    ///             // The handler's writes go through `tx`: they commit with the done mark.
    ///             sqlx::query("INSERT INTO coupons VALUES ('order-7', 'C-1')")
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok("C-1".to_string())
    ///         }))
    ///         .await;
    ///     assert_eq!(code.unwrap(), "C-1"); // the 2nd and 3rd deliveries replay
    /// }
    /// let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons").fetch_one(store.pool()).await.unwrap();
    /// assert_eq!(rows, 1);
    /// # drop(store);
    /// # let _ = std::fs::remove_file(&path);
    /// # });
    /// ```
    pub async fn run_in_tx<R, F>(&self, opts: &Options, call: Call, handler: F) -> R
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        self.run_tx(None, opts, call, handler).await
    }

    /// [`run_in_tx`](Self::run_in_tx) with a transaction the caller began (e.g. with its own
    /// isolation level: `pool.begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")`). It is
    /// committed on success and rolled back otherwise; when the key is replayed, in flight or
    /// refused, the handler does not run and the transaction is rolled back unused.
    ///
    /// On SQLite, the transaction must not hold the write lock yet (a plain deferred `BEGIN` with
    /// no writes), since the key is claimed on another connection first.
    pub async fn run_with_tx<R, F>(
        &self,
        tx: Transaction<'static, DB>,
        opts: &Options,
        call: Call,
        handler: F,
    ) -> R
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        self.run_tx(Some(tx), opts, call, handler).await
    }

    async fn run_tx<R, F>(
        &self,
        given: Option<Transaction<'static, DB>>,
        opts: &Options,
        call: Call,
        handler: F,
    ) -> R
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        let key = call.key().ok().cloned();
        let body = move |lease: Lease| async move {
            let Some(key) = key else {
                // `execute` refuses an invalid key before it calls the handler.
                return fail(Error::InvalidKey {
                    reason: "the key is empty",
                });
            };
            match self.transact(given, opts, &key, &lease, handler).await {
                Ok((value, _output)) => R::from_result(Ok(value)),
                Err(failed) => failed,
            }
        };
        execute(self, opts, call, Marking::ByHandler, body).await
    }

    /// The transactional mode's middle, shared with the layered store: begin a transaction (or take
    /// the caller's), run the handler in it, write the done mark for `lease` in it, commit. Returns
    /// the value and its encoded output, or the outcome to return as it is (the handler's own
    /// error, or idem's).
    pub(crate) async fn transact<R, F>(
        &self,
        given: Option<Transaction<'static, DB>>,
        opts: &Options,
        key: &Key,
        lease: &Lease,
        handler: F,
    ) -> Result<(R::Ok, Vec<u8>), R>
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        let scope = opts.scope_str();
        let mut tx = match given {
            Some(tx) => tx,
            // The SQL store's own way to begin (SQLite: `BEGIN IMMEDIATE`).
            None => DB::begin_tx(&self.inner.pool).await.map_err(|e| {
                fail(Error::Unavailable {
                    phase: Phase::Begin,
                    source: Box::new(e),
                })
            })?,
        };
        let value = match handler(&mut tx).await.into_result() {
            Ok(value) => value,
            Err(e) => {
                rollback(tx).await;
                return Err(R::from_result(Err(e)));
            }
        };
        let output = codec::encode(&value);
        if let Err(e) = self
            .complete_in(&mut tx, scope, key, lease, &output, opts.keep)
            .await
        {
            rollback(tx).await;
            return Err(fail(store_error(e, Phase::Complete, scope, key)));
        }
        tx.commit().await.map_err(|e| {
            fail(Error::Unavailable {
                phase: Phase::Complete,
                source: Box::new(e),
            })
        })?;
        Ok((value, output))
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, StoreError> {
        self.inner.pool.acquire().await.map_err(db_error)
    }
}

pub(crate) fn fail<R: Outcome>(e: Error) -> R
where
    R::Err: From<Error>,
{
    R::from_result(Err(e.into()))
}

async fn rollback<DB: Backend>(tx: Transaction<'static, DB>) {
    if let Err(e) = tx.rollback().await {
        // The connection is closed or broken: the database rolls back on its side.
        tracing::debug!(error = %e, "rollback failed");
    }
}

#[async_trait::async_trait]
impl<DB: Backend> Store for SqlStore<DB> {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let scope = stored_scope(req.scope);
        let claim = Claim {
            at: At {
                scope: &scope,
                key: req.key.as_str(),
            },
            token: req.token,
            ttl_us: micros(req.ttl),
            fingerprint: req.fingerprint.map(|f| f.0),
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
        let scope = stored_scope(scope);
        let at = At {
            scope: &scope,
            key: key.as_str(),
        };
        let mut conn = self.acquire().await?;
        DB::release(&mut conn, &self.inner.sql, &at, lease.token).await
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

    fn release_detached(&self, scope: &str, key: &Key, lease: Lease) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // No runtime to release on: the lease expires after its ttl.
        };
        let (store, scope, key) = (self.clone(), scope.to_owned(), key.clone());
        rt.spawn(async move {
            if let Err(e) = store.release(&scope, &key, &lease).await {
                tracing::warn!(scope, key = %key, error = %e, "background release failed; the key frees when its lease expires");
            }
        });
    }
}

// ---- Shared between the backends ----

/// The row states.
pub(crate) const FREE: i16 = 0;
pub(crate) const IN_FLIGHT: i16 = 1;
pub(crate) const DONE: i16 = 2;

/// How many times `begin` re-runs when a concurrent claim changed the row between its statements.
pub(crate) const MAX_RACES: usize = 32;

/// Scopes longer than this are stored as their SHA-256 (the key column is sized for keys, which
/// [`Key`] already bounds).
const MAX_SCOPE_LEN: usize = 200;

/// The token as stored (16 bytes, big-endian).
pub(crate) fn token_bytes(t: Token) -> [u8; 16] {
    t.0.to_be_bytes()
}

pub(crate) fn token_of(bytes: &[u8]) -> Result<Token, StoreError> {
    let b: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("token of {} bytes", bytes.len())))?;
    Ok(Token(u128::from_be_bytes(b)))
}

/// Durations as microseconds, capped far below `i64::MAX` so that `now + d` never overflows.
pub(crate) fn micros(d: Duration) -> i64 {
    const CAP: i64 = 1 << 60; // about 36,000 years
    i64::try_from(d.as_micros()).map_or(CAP, |us| us.min(CAP))
}

fn stored_scope(scope: &str) -> Cow<'_, str> {
    if scope.len() <= MAX_SCOPE_LEN {
        return Cow::Borrowed(scope);
    }
    let digest = Sha256::digest(scope.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
    }
    Cow::Owned(s)
}

/// The table does not exist: say what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("the idempotency table does not exist: call SqlStore::migrate() at start-up ({0})")]
struct MissingTable(sqlx::Error);

/// Map a driver error: decoding problems are corrupt records, everything else is the database
/// being unavailable (with a hint when the table is missing).
pub(crate) fn db_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        sqlx::Error::Database(ref d) if is_missing_table(&**d) => {
            StoreError::Unavailable(Box::new(MissingTable(e)))
        }
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// A value read back that does not decode.
pub(crate) fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn is_missing_table(d: &dyn sqlx::error::DatabaseError) -> bool {
    // PostgreSQL 42P01 undefined_table; MySQL/MariaDB 42S02 (1146); SQLite has no code for it.
    matches!(d.code().as_deref(), Some("42P01" | "42S02"))
        || d.message().starts_with("no such table")
}

/// After a mark that wrote nothing: fine if this token already completed the key (a retry),
/// otherwise another holder owns it.
pub(crate) fn done_by(row: Option<(i16, Vec<u8>)>, token: Token) -> Result<(), StoreError> {
    match row {
        Some((DONE, t)) if token_of(&t)? == token => Ok(()),
        Some((FREE | IN_FLIGHT | DONE, _)) | None => Err(StoreError::LeaseLost),
        Some((other, _)) => Err(StoreError::Corrupt(format!("unknown row state {other}"))),
    }
}

/// Split a migration file into its statements.
pub(crate) fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n").map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for ok in ["idem_keys", "_x", "app.idem_keys", "A1_b2"] {
            assert!(Table::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a.b.c",
            "a b",
            "x;drop",
            "\"q\"",
            ".x",
            "x.",
            &"x".repeat(49),
        ] {
            assert!(Table::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn long_scopes_are_hashed_not_truncated() {
        let a = "s".repeat(300) + "a";
        let b = "s".repeat(300) + "b";
        assert_ne!(stored_scope(&a), stored_scope(&b));
        assert!(stored_scope(&a).len() <= MAX_SCOPE_LEN);
        assert_eq!(stored_scope("short"), "short");
    }

    #[test]
    fn migration_files_split_into_statements() {
        let sql = "-- comment\nCREATE TABLE a (x INT);\n\n-- another\nCREATE INDEX i ON a (x);\n";
        let v: Vec<_> = statements(sql).collect();
        assert_eq!(v.len(), 2);
        assert!(v[1].ends_with("ON a (x);") || v[1].ends_with("ON a (x)"));
    }

    #[test]
    fn micros_never_overflow() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert!(micros(Duration::MAX) < i64::MAX / 2);
    }
}
