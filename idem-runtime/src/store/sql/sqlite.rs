//! The SQL store on SQLite.

use sqlx::sqlite::SqliteRow;
use sqlx::{Pool, Row, SqlStr, Sqlite, SqliteConnection};

use super::sealed::{At, Claim, Current, Mark, Migrations, Ops, Seen, Table};
use super::{
    Backend, MAX_RACES, apply_migrations, claim_gone, corrupt, db_error as unavailable, done_by,
    side_pool_with, token_bytes, watchdog_pool,
};
use crate::StoreError;
use crate::store::{Begin, Token};

/// The database's clock, in microseconds since 1970 (SQLite's clock has millisecond precision,
/// and `'now'` is fixed for the statement). `julianday` works on every SQLite version.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// Claim an absent key. No row back: it exists (read it).
const CLAIM: &str = "INSERT INTO {table}
    (scope, idem_key, state, token, fence, expires_at, fingerprint, output, claimed_at, holder)
VALUES (?1, ?2, 1, ?3, {now}, {now} + ?4, ?5, NULL, {now}, ?6)
ON CONFLICT (scope, idem_key) DO NOTHING
RETURNING fence";

/// Take over a free or expired row (fence + 1, or the clock if larger), or renew our own lease
/// (same fence): one atomic statement that re-checks the row as it is now.
const TAKE_OVER: &str = "UPDATE {table} SET
    state = 1,
    token = ?3,
    fence = CASE WHEN state = 1 AND token = ?3 AND expires_at > {now}
                 THEN fence ELSE max(fence + 1, {now}) END,
    claimed_at = CASE WHEN state = 1 AND token = ?3 AND expires_at > {now}
                 THEN claimed_at ELSE {now} END,
    expires_at = {now} + ?4,
    fingerprint = ?5,
    output = NULL,
    holder = ?6
WHERE scope = ?1 AND idem_key = ?2
  AND (state IN (0, 3) OR expires_at <= {now} OR (state = 1 AND token = ?3))
RETURNING fence";

/// The usual mark: our lease still holds the key.
const MARK: &str = "UPDATE {table} SET state = 2, expires_at = {now} + ?4, output = ?5,
    fingerprint = ?6
WHERE scope = ?1 AND idem_key = ?2 AND state = 1 AND token = ?3";

const READ: &str = "SELECT state, token, fence, expires_at - {now}, fingerprint, output
FROM {table} WHERE scope = ?1 AND idem_key = ?2";

/// Otherwise: mark done if nobody else holds the key (free, lapsed, or purged), with the lease's
/// fingerprint.
const COMPLETE: &str = "INSERT INTO {table}
    (scope, idem_key, state, token, fence, expires_at, fingerprint, output)
VALUES (?1, ?2, 2, ?3, {now}, {now} + ?4, ?6, ?5)
ON CONFLICT (scope, idem_key) DO UPDATE SET
    state = 2,
    token = excluded.token,
    expires_at = excluded.expires_at,
    output = excluded.output,
    fingerprint = excluded.fingerprint
WHERE (state = 1 AND token = excluded.token) OR state = 0 OR expires_at <= {now}
RETURNING 1";

const OWNER: &str = "SELECT state, token FROM {table} WHERE scope = ?1 AND idem_key = ?2";

/// The row is kept (marked free) so that the next lease's fence continues from this one.
const RELEASE: &str = "UPDATE {table}
SET state = 0, output = NULL, fingerprint = NULL, expires_at = {now}
WHERE scope = ?1 AND idem_key = ?2 AND state = 1 AND token = ?3";

const EXTEND: &str = "UPDATE {table} SET expires_at = {now} + ?4
WHERE scope = ?1 AND idem_key = ?2 AND state = 1 AND token = ?3";

/// `DELETE ... LIMIT` needs a compile-time option; a rowid subquery does not. A row whose fence
/// the clock has not passed yet is kept (see the module docs on fences): the clock has only
/// millisecond precision, so a row claimed, released and purged within one millisecond would
/// otherwise hand the next claim the same fence.
const PURGE: &str = "DELETE FROM {table} WHERE rowid IN (
    SELECT rowid FROM {table} WHERE expires_at <= {now} AND fence < {now} LIMIT ?1)";

const MIGRATIONS: Migrations = &[
    (
        1,
        "create idem_keys",
        include_str!("../../../migrations/sqlite/0001_create_idem_keys.sql"),
    ),
    (
        2,
        "add holder",
        include_str!("../../../migrations/sqlite/0002_add_holder.sql"),
    ),
];

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table}_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)";

pub struct Sql {
    claim: SqlStr,
    take_over: SqlStr,
    mark: SqlStr,
    read: SqlStr,
    complete: SqlStr,
    owner: SqlStr,
    release: SqlStr,
    extend: SqlStr,
    purge: SqlStr,
}

impl Backend for Sqlite {}

returning_ops! {
impl Ops for Sqlite, SqliteConnection {
    async fn complete(conn: &mut SqliteConnection, sql: &Sql, mark: &Mark<'_>) -> Result<(), StoreError> {
        let token = token_bytes(mark.token);
        let marked = sqlx::query(sql.mark.clone())
            .bind(mark.at.scope)
            .bind(mark.at.key)
            .bind(&token[..])
            .bind(mark.keep_us)
            .bind(mark.output)
            .bind(mark.fingerprint.as_ref().map(|f| &f[..]))
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        if marked.rows_affected() == 1 {
            return Ok(());
        }
        // In the transaction the claim was made in, its row is there: a mark that finds it
        // taken writes no row of its own (it would commit by itself for writes that are gone,
        // were the transaction ended under the call).
        if !mark.in_tx {
            let written = sqlx::query(sql.complete.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .bind(&token[..])
                .bind(mark.keep_us)
                .bind(mark.output)
                .bind(mark.fingerprint.as_ref().map(|f| &f[..]))
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            if written.is_some() {
                return Ok(());
            }
        }
        let row: Option<(i16, Vec<u8>)> = sqlx::query_as(sql.owner.clone())
            .bind(mark.at.scope)
            .bind(mark.at.key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?;
        if row.is_none() && mark.in_tx {
            return Err(claim_gone());
        }
        done_by(row, mark.token)
    }

    type Sql = Sql;
    const MIGRATIONS: Migrations = MIGRATIONS;
    const MIGRATIONS_TABLE: &'static str = MIGRATIONS_TABLE;
    const NOW: &'static str = NOW;
    const CLAIMS_IN_TX: bool = true;
    const CLAIM_LOCKS_DATABASE: bool = true;
    fn side_pool(pool: &Pool<Sqlite>) -> Option<Pool<Sqlite>> {
        // As for the watchdog: only a database in a file can be reached by another pool.
        // Used only for the committed-done read, which must never wait for a lock: in
        // rollback-journal mode a transaction holding the EXCLUSIVE lock (`BEGIN EXCLUSIVE`, or
        // writes spilled from the page cache) keeps readers out, and that transaction may be the
        // very one the read is made for. Busy at once, the read gives up and the claim in the
        // transaction answers, as before the read existed.
        let connect = (*pool.connect_options()).clone().busy_timeout(std::time::Duration::ZERO);
        pool.connect_options()
            .get_filename()
            .is_file()
            .then(|| side_pool_with(pool, connect))
    }

    fn watchdog_pool(pool: &Pool<Sqlite>) -> Option<Pool<Sqlite>> {
        // SQLite's connections run on threads of their own, but the application may hold every
        // connection of its pool (often one) while a handler runs: a database in a file gets a
        // connection of its own for renewals. Any other (in memory, private or shared; temporary)
        // exists only for its own pool's connections, so renewals go through that pool. Asked
        // after a claim, so a file the pool creates exists by then.
        pool.connect_options()
            .get_filename()
            .is_file()
            .then(|| watchdog_pool(pool, 1))
    }

    fn prepare(t: &Table) -> Sql {
        Sql {
            claim: t.fill(CLAIM, NOW),
            take_over: t.fill(TAKE_OVER, NOW),
            mark: t.fill(MARK, NOW),
            read: t.fill(READ, NOW),
            complete: t.fill(COMPLETE, NOW),
            owner: t.fill(OWNER, NOW),
            release: t.fill(RELEASE, NOW),
            extend: t.fill(EXTEND, NOW),
            purge: t.fill(PURGE, NOW),
        }
    }

    async fn migrate(pool: &Pool<Sqlite>, t: &Table) -> Result<(), sqlx::Error> {
        // The write lock from the start serialises concurrent start-ups; DDL is transactional.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        apply_migrations::<Sqlite>(
            &mut tx,
            t,
            NOW,
            Self::MIGRATIONS,
            MIGRATIONS_TABLE,
            "INSERT INTO {table}_migrations (version, name) VALUES (?1, ?2)",
        )
        .await?;
        tx.commit().await
    }

    async fn begin(
        conn: &mut SqliteConnection,
        sql: &Sql,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        // Read first: a duplicate of a done or in-flight key is answered without the write lock
        // (SQLite has one writer at a time).
        let token = token_bytes(claim.token);
        let fingerprint = claim.fingerprint.as_ref().map(|f| &f[..]);
        for _ in 0..MAX_RACES {
            let row: Option<SqliteRow> = sqlx::query(sql.read.clone())
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            let statement = match row {
                None => sql.claim.clone(),
                Some(row) => {
                    let current = Current {
                        state: row.try_get(0).map_err(corrupt)?,
                        token: row.try_get(1).map_err(corrupt)?,
                        remaining_us: row.try_get(3).map_err(corrupt)?,
                        fingerprint: row.try_get(4).map_err(corrupt)?,
                        output: row.try_get(5).map_err(corrupt)?,
                    };
                    if let Seen::Answer(answer) = current.judge(claim)? {
                        return Ok(answer);
                    }
                    sql.take_over.clone()
                }
            };
            let fence: Option<i64> = sqlx::query_scalar(statement)
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .bind(&token[..])
                .bind(claim.ttl_us)
                .bind(fingerprint)
                .bind(claim.holder)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            if let Some(fence) = fence {
                return Ok(Begin::Acquired(claim.lease(fence as u64)));
            }
            // Another claim changed the row between the two statements: look again.
        }
        Err(StoreError::unavailable(
            "begin kept racing with concurrent claims of the same key",
        ))
    }

    /// In the caller's transaction, a write first: it takes the database's write lock (waiting
    /// up to `busy_timeout`), which the transaction then holds until it ends, so nothing can
    /// change the row between the look and the claim, and no claim of ours commits while the
    /// caller's transaction reads (which would make its later writes fail with `SQLITE_BUSY`).
    async fn begin_in(
        conn: &mut SqliteConnection,
        sql: &Sql,
        _table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        let token = token_bytes(claim.token);
        let fingerprint = claim.fingerprint.as_ref().map(|f| &f[..]);
        let bind = |statement: SqlStr| {
            sqlx::query_scalar::<_, i64>(statement)
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .bind(&token[..])
                .bind(claim.ttl_us)
                .bind(fingerprint)
                .bind(claim.holder)
        };
        if let Some(fence) = bind(sql.claim.clone())
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?
        {
            return Ok(Begin::Acquired(claim.lease(fence as u64)));
        }
        let row: SqliteRow = sqlx::query(sql.read.clone())
            .bind(claim.at.scope)
            .bind(claim.at.key)
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        let current = Current {
            state: row.try_get(0).map_err(corrupt)?,
            token: row.try_get(1).map_err(corrupt)?,
            remaining_us: row.try_get(3).map_err(corrupt)?,
            fingerprint: row.try_get(4).map_err(corrupt)?,
            output: row.try_get(5).map_err(corrupt)?,
        };
        if let Seen::Answer(answer) = current.judge(claim)? {
            return Ok(answer);
        }
        match bind(sql.take_over.clone())
            .fetch_optional(&mut *conn)
            .await
            .map_err(unavailable)?
        {
            Some(fence) => Ok(Begin::Acquired(claim.lease(fence as u64))),
            None => Err(StoreError::Corrupt(
                "a row changed under the write lock".into(),
            )),
        }
    }

    async fn raw(conn: &mut SqliteConnection, sql: String) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map(|_| ())
    }
}
}

impl super::SqlStore<Sqlite> {
    /// The embedded default: a store on the SQLite file at `path` (created if missing), in WAL
    /// mode with a 10 s `busy_timeout`, migrated and ready. No server needed, and the records
    /// survive a restart of the process.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let dir = std::env::temp_dir().join(format!("idem-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir).unwrap();
    /// let store = idem_runtime::SqliteStore::open(dir.join("idem.sqlite")).await.unwrap();
    /// idem_runtime::install_default_store(store).unwrap();
    /// # std::fs::remove_dir_all(dir).ok();
    /// # });
    /// ```
    pub async fn open(path: impl AsRef<std::path::Path>) -> Result<Self, StoreError> {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL is durable against process crashes (not power loss), and cheap.
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        // Processes opening a new file at once: switching it to WAL answers SQLITE_BUSY at once
        // (no busy handler) to all but one of them. They try again, for as long as busy_timeout.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let pool = loop {
            match SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(options.clone())
                .await
            {
                Err(sqlx::Error::Database(e))
                    if e.code()
                        .is_some_and(|c| c.parse::<i32>().is_ok_and(|c| c & 0xff == 5))
                        && std::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                r => break r.map_err(unavailable)?,
            }
        };
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
    }
}
