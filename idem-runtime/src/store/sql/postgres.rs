//! The SQL store on PostgreSQL.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Pool, Postgres, Row, SqlStr};

use super::sealed::{At, Claim, Current, Mark, Migrations, Ops, Seen, Table};
use super::{
    Backend, MAX_RACES, advisory_key, apply_migrations, corrupt, db_error as unavailable, done_by,
    token_bytes, watchdog_pool,
};
use crate::StoreError;
use crate::store::{Begin, Token};

/// The database's clock, in microseconds since 1970, fixed for the statement.
const NOW: &str = "(extract(epoch from statement_timestamp()) * 1000000)::bigint";

/// Claim an absent key and, when it exists, return its row: one statement for the first call of
/// a key and for every answer that is not a takeover. `DO NOTHING` takes no row lock, so a
/// duplicate of a done key is a plain read (no transaction id, no WAL flush). When a concurrent
/// claim committed after this statement's snapshot, the second half sees no row and the caller
/// runs it again.
const BEGIN: &str = "WITH claim AS (
    INSERT INTO {table} (scope, idem_key, state, token, fence, expires_at, fingerprint, output)
    VALUES ($1, $2, 1, $3, {now}, {now} + $4, $5, NULL)
    ON CONFLICT (scope, idem_key) DO NOTHING
    RETURNING fence
)
SELECT TRUE AS claimed, 1::smallint AS state, NULL::bytea AS token, fence,
       0::bigint AS remaining, NULL::bytea AS fingerprint, NULL::bytea AS output
FROM claim
UNION ALL
SELECT FALSE, state, token, fence, expires_at - {now}, fingerprint, output
FROM {table}
WHERE scope = $1 AND idem_key = $2 AND NOT EXISTS (SELECT 1 FROM claim)";

/// Take over a free or expired row (fence + 1, or the clock if larger), or renew our own lease
/// (same fence): one atomic statement that re-checks the row as it is now.
const TAKE_OVER: &str = "UPDATE {table} SET
    state = 1,
    token = $3,
    fence = CASE WHEN state = 1 AND token = $3 AND expires_at > {now}
                 THEN fence ELSE GREATEST(fence + 1, {now}) END,
    expires_at = {now} + $4,
    fingerprint = $5,
    output = NULL
WHERE scope = $1 AND idem_key = $2
  AND (state = 0 OR expires_at <= {now} OR (state = 1 AND token = $3))
RETURNING fence";

/// The usual mark: our lease still holds the key.
const MARK: &str = "UPDATE {table} SET state = 2, expires_at = {now} + $4, output = $5
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3";

/// Otherwise: mark done if nobody else holds the key (free, lapsed, or purged), with the lease's
/// fingerprint.
const COMPLETE: &str = "INSERT INTO {table} AS r
    (scope, idem_key, state, token, fence, expires_at, fingerprint, output)
VALUES ($1, $2, 2, $3, {now}, {now} + $4, $6, $5)
ON CONFLICT (scope, idem_key) DO UPDATE SET
    state = 2,
    token = EXCLUDED.token,
    expires_at = EXCLUDED.expires_at,
    output = EXCLUDED.output,
    fingerprint = EXCLUDED.fingerprint
WHERE (r.state = 1 AND r.token = EXCLUDED.token) OR r.state = 0 OR r.expires_at <= {now}
RETURNING 1";

/// The transactional form's claim: a transaction-scoped advisory lock for the key, taken without
/// waiting. It is held until the caller's transaction ends, so a second transaction claiming the
/// key is told "in flight" at once instead of blocking on the first one's row.
const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

const OWNER: &str = "SELECT state, token FROM {table} WHERE scope = $1 AND idem_key = $2";

/// The row is kept (marked free) so that the next lease's fence continues from this one.
const RELEASE: &str = "UPDATE {table}
SET state = 0, output = NULL, fingerprint = NULL, expires_at = {now}
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3";

const EXTEND: &str = "UPDATE {table} SET expires_at = {now} + $4
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3";

/// Rows being claimed right now are locked, and skipped.
const PURGE: &str = "DELETE FROM {table} WHERE (scope, idem_key) IN (
    SELECT scope, idem_key FROM {table} WHERE expires_at <= {now}
    LIMIT $1 FOR UPDATE SKIP LOCKED)";

const MIGRATIONS: Migrations = &[(
    1,
    "create idem_keys",
    include_str!("../../../migrations/postgres/0001_create_idem_keys.sql"),
)];

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table}_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";

pub struct Sql {
    begin: SqlStr,
    take_over: SqlStr,
    mark: SqlStr,
    complete: SqlStr,
    owner: SqlStr,
    release: SqlStr,
    extend: SqlStr,
    purge: SqlStr,
}

impl Backend for Postgres {}

returning_ops! {
impl Ops for Postgres, PgConnection {
    type Sql = Sql;
    const MIGRATIONS: Migrations = MIGRATIONS;
    const CLAIMS_IN_TX: bool = true;
    const CLAIM_LOCKS_DATABASE: bool = false;
    fn watchdog_pool(pool: &Pool<Postgres>) -> Option<Pool<Postgres>> {
        // Its connections are bound to the runtime that opened them: the watchdog's own.
        Some(watchdog_pool(pool, 4))
    }

    fn prepare(t: &Table) -> Sql {
        Sql {
            begin: t.fill(BEGIN, NOW),
            take_over: t.fill(TAKE_OVER, NOW),
            mark: t.fill(MARK, NOW),
            complete: t.fill(COMPLETE, NOW),
            owner: t.fill(OWNER, NOW),
            release: t.fill(RELEASE, NOW),
            extend: t.fill(EXTEND, NOW),
            purge: t.fill(PURGE, NOW),
        }
    }

    async fn migrate(pool: &Pool<Postgres>, t: &Table) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        // Serialise concurrent start-ups: concurrent CREATE TABLE IF NOT EXISTS can fail in
        // PostgreSQL. The lock ends with the transaction.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("idem_runtime migrate {}", t.qualified))
            .execute(&mut *tx)
            .await?;
        apply_migrations::<Postgres>(
            &mut tx,
            t,
            NOW,
            Self::MIGRATIONS,
            MIGRATIONS_TABLE,
            "INSERT INTO {table}_migrations (version, name) VALUES ($1, $2)",
        )
        .await?;
        tx.commit().await
    }

    async fn begin(
        conn: &mut PgConnection,
        sql: &Sql,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        for _ in 0..MAX_RACES {
            let row: Option<PgRow> = sqlx::query(sql.begin.clone())
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .bind(&token_bytes(claim.token)[..])
                .bind(claim.ttl_us)
                .bind(claim.fingerprint.as_ref().map(|f| &f[..]))
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            let Some(row) = row else {
                continue; // a concurrent claim committed after our snapshot: look again
            };
            if row.try_get::<bool, _>(0).map_err(corrupt)? {
                let fence = row.try_get::<i64, _>(3).map_err(corrupt)?;
                return Ok(Begin::Acquired(claim.lease(fence as u64)));
            }
            let current = Current {
                state: row.try_get(1).map_err(corrupt)?,
                token: row.try_get(2).map_err(corrupt)?,
                remaining_us: row.try_get(4).map_err(corrupt)?,
                fingerprint: row.try_get(5).map_err(corrupt)?,
                output: row.try_get(6).map_err(corrupt)?,
            };
            if let Seen::Answer(answer) = current.judge(claim)? {
                return Ok(answer);
            }
            let fence: Option<i64> = sqlx::query_scalar(sql.take_over.clone())
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .bind(&token_bytes(claim.token)[..])
                .bind(claim.ttl_us)
                .bind(claim.fingerprint.as_ref().map(|f| &f[..]))
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            if let Some(fence) = fence {
                return Ok(Begin::Acquired(claim.lease(fence as u64)));
            }
            // Another claim took the row between the two statements: look again.
        }
        Err(StoreError::unavailable(
            "begin kept racing with concurrent claims of the same key",
        ))
    }

    async fn begin_in(
        conn: &mut PgConnection,
        sql: &Sql,
        table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        let lock = advisory_key(&table.qualified, claim.at.scope, claim.at.key);
        let got: bool = sqlx::query_scalar(TRY_LOCK)
            .bind(lock)
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        if !got {
            // Another transaction holds the key; it gives it back when it ends.
            return Ok(Begin::InFlight {
                retry_after: claim.retry_hint(),
            });
        }
        // Under the lock, the row is ours to read and write in this transaction.
        Self::begin(conn, sql, claim).await
    }

    async fn raw(conn: &mut PgConnection, sql: &'static str) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sql).execute(&mut *conn).await.map(|_| ())
    }
}
}
