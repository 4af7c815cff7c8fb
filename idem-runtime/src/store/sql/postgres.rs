//! The SQL store on PostgreSQL.

use sqlx::{PgConnection, Pool, Postgres, SqlStr};

use super::pg_exec::PgExec;
use super::sealed::{At, Claim, Current, Mark, Migrations, Ops, Seen, Table};
use super::{
    Backend, MAX_RACES, advisory_key, apply_migrations, claim_gone, db_error as unavailable,
    done_by, side_pool, token_bytes, watchdog_pool,
};
use crate::StoreError;
use crate::pg_tx::{Param, PgTransaction};
use crate::store::{Begin, Token};

/// The database's clock, in microseconds since 1970, fixed for the statement.
const NOW: &str = "(extract(epoch from statement_timestamp()) * 1000000)::bigint";

/// The database's clock as it is when evaluated: in `RETURNING`, after any wait for a row lock.
/// A claim's lease is measured against it, since `NOW` was taken before that wait.
const CLOCK: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// A claim that waited (a row lock held by a purge, or another claim) may have been granted a
/// lease that is mostly, or wholly, over: below this share of its ttl it is renewed before
/// `begin` answers.
const FRESH_SHARE: (i64, i64) = (3, 4);

/// Claim an absent key and, when it exists, return its row: one statement for the first call of
/// a key and for every answer that is not a takeover. `DO NOTHING` takes no row lock, so a
/// duplicate of a done key is a plain read (no transaction id, no WAL flush). When a concurrent
/// claim committed after this statement's snapshot, the second half sees no row and the caller
/// runs it again.
const BEGIN: &str = "WITH claim AS (
    INSERT INTO {table}
        (scope, idem_key, state, token, fence, expires_at, fingerprint, output, claimed_at, holder)
    VALUES ($1, $2, 1, $3, {now}, {now} + $4, $5, NULL, {now}, $6)
    ON CONFLICT (scope, idem_key) DO NOTHING
    RETURNING fence, expires_at - {clock} AS remaining
)
SELECT TRUE AS claimed, 1::smallint AS state, NULL::bytea AS token, fence,
       remaining, NULL::bytea AS fingerprint, NULL::bytea AS output
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
    claimed_at = CASE WHEN state = 1 AND token = $3 AND expires_at > {now}
                 THEN claimed_at ELSE {now} END,
    expires_at = {now} + $4,
    fingerprint = $5,
    output = NULL,
    holder = $6
WHERE scope = $1 AND idem_key = $2
  AND (state IN (0, 3) OR expires_at <= {now} OR (state = 1 AND token = $3))
RETURNING fence, expires_at - {clock}";

/// Renew a lease just granted, measured from the clock as it is now; what is left of it.
const REFRESH: &str = "UPDATE {table} SET expires_at = {clock} + $4
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3
RETURNING expires_at - {clock}";

/// The usual mark: our lease still holds the key.
const MARK: &str = "UPDATE {table} SET state = 2, expires_at = {now} + $4, output = $5,
    fingerprint = $6
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

/// The table's OID (`NULL` when it is not found).
const REGCLASS: &str = "SELECT to_regclass($1)::oid::bigint";

const OWNER: &str = "SELECT state, token FROM {table} WHERE scope = $1 AND idem_key = $2";

/// The row as committed (a plain read never waits for a row lock).
const READ: &str = "SELECT state, token, fence, expires_at - {now}, fingerprint, output
FROM {table} WHERE scope = $1 AND idem_key = $2";

/// The row is kept (marked free) so that the next lease's fence continues from this one.
const RELEASE: &str = "UPDATE {table}
SET state = 0, output = NULL, fingerprint = NULL, expires_at = {now}
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3";

const EXTEND: &str = "UPDATE {table} SET expires_at = {now} + $4
WHERE scope = $1 AND idem_key = $2 AND state = 1 AND token = $3";

/// Rows being claimed right now are locked, and skipped. A row whose fence the clock has not
/// passed yet is kept (see the module docs on fences).
const PURGE: &str = "DELETE FROM {table} WHERE (scope, idem_key) IN (
    SELECT scope, idem_key FROM {table} WHERE expires_at <= {now} AND fence < {now}
    LIMIT $1 FOR UPDATE SKIP LOCKED)";

const MIGRATIONS: Migrations = &[
    (
        1,
        "create idem_keys",
        include_str!("../../../migrations/postgres/0001_create_idem_keys.sql"),
    ),
    (
        2,
        "add holder",
        include_str!("../../../migrations/postgres/0002_add_holder.sql"),
    ),
];

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table}_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";

pub struct Sql {
    begin: SqlStr,
    take_over: SqlStr,
    refresh: SqlStr,
    mark: SqlStr,
    complete: SqlStr,
    owner: SqlStr,
    read: SqlStr,
    release: SqlStr,
    extend: SqlStr,
    purge: SqlStr,
}

impl Backend for Postgres {}

/// The parameters of [`BEGIN`] and [`TAKE_OVER`] (and, by position, of [`REFRESH`]).
fn claim_params<'a>(claim: &'a Claim<'a>, token: &'a [u8; 16]) -> [Param<'a>; 6] {
    [
        Param::Text(Some(claim.at.scope)),
        Param::Text(Some(claim.at.key)),
        Param::Bytes(Some(&token[..])),
        Param::I64(Some(claim.ttl_us)),
        Param::Bytes(claim.fingerprint.as_ref().map(|f| &f[..])),
        Param::Text(Some(claim.holder)),
    ]
}

/// Whether the lease just claimed, with `left` µs of it left by the clock after the statement,
/// is fresh: renewed (up to three times) while less than [`FRESH_SHARE`] of its ttl is left.
/// `false`: another claim took the key meanwhile.
async fn fresh<E: PgExec + ?Sized>(
    conn: &mut E,
    sql: &Sql,
    claim: &Claim<'_>,
    mut left: i64,
) -> Result<bool, StoreError> {
    let enough = claim.ttl_us / FRESH_SHARE.1 * FRESH_SHARE.0;
    let token = token_bytes(claim.token);
    for _ in 0..3 {
        if left >= enough {
            return Ok(true);
        }
        let renewed = conn
            .row(sql.refresh.as_str(), &claim_params(claim, &token)[..4])
            .await?;
        match renewed {
            Some(mut row) => left = row.int_at(0)?,
            None => return Ok(false),
        }
    }
    Err(StoreError::unavailable(
        "the claim's lease keeps ending while it is granted (row locks held for longer than its ttl)",
    ))
}

/// Claim the key, or read what holds it: `Ops::begin` on any connection.
async fn begin_on<E: PgExec + ?Sized>(
    conn: &mut E,
    sql: &Sql,
    claim: &Claim<'_>,
) -> Result<Begin, StoreError> {
    let token = token_bytes(claim.token);
    let params = claim_params(claim, &token);
    for _ in 0..MAX_RACES {
        let Some(mut row) = conn.row(sql.begin.as_str(), &params).await? else {
            continue; // a concurrent claim committed after our snapshot: look again
        };
        if row.bool_at(0)? {
            let fence = row.int_at(3)?;
            let left = row.int_at(4)?;
            if fresh(conn, sql, claim, left).await? {
                return Ok(Begin::Acquired(claim.lease(fence as u64)));
            }
            continue; // taken over while it waited: look again
        }
        let current = Current {
            state: row.small_at(1)?,
            token: row.bytes_at(2)?,
            remaining_us: row.int_at(4)?,
            fingerprint: row.opt_bytes_at(5)?,
            output: row.opt_bytes_at(6)?,
        };
        if let Seen::Answer(answer) = current.judge(claim)? {
            return Ok(answer);
        }
        let taken = conn.row(sql.take_over.as_str(), &params).await?;
        if let Some(mut taken) = taken {
            let (fence, left) = (taken.int_at(0)?, taken.int_at(1)?);
            if fresh(conn, sql, claim, left).await? {
                return Ok(Begin::Acquired(claim.lease(fence as u64)));
            }
        }
        // Another claim took the row between the two statements: look again.
    }
    Err(StoreError::unavailable(
        "begin kept racing with concurrent claims of the same key",
    ))
}

/// The transactional claim (`Ops::begin_in`) on any connection inside the caller's transaction.
async fn begin_in_on<E: PgExec + ?Sized>(
    conn: &mut E,
    sql: &Sql,
    table: &Table,
    claim: &Claim<'_>,
) -> Result<Begin, StoreError> {
    let identity = match table.identity.get() {
        Some(identity) => identity.clone(),
        None => {
            // The table's OID: the same whatever its spelling (schema-qualified or not).
            let oid = match conn
                .row(REGCLASS, &[Param::Text(Some(&table.qualified))])
                .await?
            {
                Some(mut row) => row.opt_int_at(0)?,
                None => None,
            };
            let identity = oid.map_or_else(|| table.qualified.clone(), |o| format!("oid:{o}"));
            table.identity.get_or_init(|| identity).clone()
        }
    };
    let lock = advisory_key(&identity, claim.at.scope, claim.at.key);
    let got = match conn.row(TRY_LOCK, &[Param::I64(Some(lock))]).await? {
        Some(mut row) => row.bool_at(0)?,
        None => return Err(StoreError::Corrupt("no answer to the advisory lock".into())),
    };
    if !got {
        // Another transaction holds the key; it gives it back when it ends.
        return Ok(Begin::InFlight {
            retry_after: claim.retry_hint(),
        });
    }
    // Under the lock, the row is ours to read and write in this transaction.
    begin_on(conn, sql, claim).await
}

/// The done mark (`Ops::complete`) on any connection.
async fn complete_on<E: PgExec + ?Sized>(
    conn: &mut E,
    sql: &Sql,
    mark: &Mark<'_>,
) -> Result<(), StoreError> {
    let token = token_bytes(mark.token);
    let params = [
        Param::Text(Some(mark.at.scope)),
        Param::Text(Some(mark.at.key)),
        Param::Bytes(Some(&token[..])),
        Param::I64(Some(mark.keep_us)),
        Param::Bytes(Some(mark.output)),
        Param::Bytes(mark.fingerprint.as_ref().map(|f| &f[..])),
    ];
    if conn.exec(sql.mark.as_str(), &params).await? == 1 {
        return Ok(());
    }
    // Not in the transaction the claim was made in: its row is there, so a mark that finds it
    // taken does not write one of its own (which would commit by itself for writes that are
    // gone, were the transaction ended under the call).
    if !mark.in_tx && conn.row(sql.complete.as_str(), &params).await?.is_some() {
        return Ok(());
    }
    let owner = match conn.row(sql.owner.as_str(), &params[..2]).await? {
        Some(mut row) => Some((row.small_at(0)?, row.bytes_at(1)?)),
        None if mark.in_tx => return Err(claim_gone()),
        None => None,
    };
    done_by(owner, mark.token)
}

returning_ops! {
impl Ops for Postgres, PgConnection {
    type Sql = Sql;
    const MIGRATIONS: Migrations = MIGRATIONS;
    const MIGRATIONS_TABLE: &'static str = MIGRATIONS_TABLE;
    const NOW: &'static str = NOW;
    const CLAIMS_IN_TX: bool = true;
    const CLAIM_LOCKS_DATABASE: bool = false;
    fn side_pool(pool: &Pool<Postgres>) -> Option<Pool<Postgres>> {
        Some(side_pool(pool))
    }

    fn watchdog_pool(pool: &Pool<Postgres>) -> Option<Pool<Postgres>> {
        // Its connections are bound to the runtime that opened them: the watchdog's own.
        Some(watchdog_pool(pool, 4))
    }

    fn prepare(t: &Table) -> Sql {
        let clocked = |template: &str| t.fill(&template.replace("{clock}", CLOCK), NOW);
        Sql {
            begin: clocked(BEGIN),
            take_over: clocked(TAKE_OVER),
            refresh: clocked(REFRESH),
            mark: t.fill(MARK, NOW),
            complete: t.fill(COMPLETE, NOW),
            owner: t.fill(OWNER, NOW),
            read: t.fill(READ, NOW),
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
        begin_on(conn, sql, claim).await
    }

    async fn begin_in(
        conn: &mut PgConnection,
        sql: &Sql,
        table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        begin_in_on(conn, sql, table, claim).await
    }

    async fn begin_in_foreign(
        tx: &mut (dyn PgTransaction + '_),
        sql: &Sql,
        table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        begin_in_on(tx, sql, table, claim).await
    }

    async fn complete(conn: &mut PgConnection, sql: &Sql, mark: &Mark<'_>) -> Result<(), StoreError> {
        complete_on(conn, sql, mark).await
    }

    async fn complete_foreign(
        tx: &mut (dyn PgTransaction + '_),
        sql: &Sql,
        mark: &Mark<'_>,
    ) -> Result<(), StoreError> {
        complete_on(tx, sql, mark).await
    }

    async fn raw(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map(|_| ())
    }
}
}
