//! The SQL store on MySQL and MariaDB.
//!
//! Neither has `RETURNING` on an upsert (MariaDB's `INSERT ... RETURNING` does not report what
//! `ON DUPLICATE KEY UPDATE` did, and MySQL has no `RETURNING`), so `begin` reads the row first
//! and then claims with one conditional statement: an `INSERT` for an absent key (the primary key
//! refuses a concurrent second one), or an `UPDATE` guarded by the fence it read for a takeover.
//! When another claim raced in between, the write changes nothing and `begin` reads again.

use sqlx::mysql::MySqlRow;
use sqlx::{MySql, MySqlConnection, Pool, Row, SqlStr};

use super::sealed::{At, Claim, Current, Mark, Migrations, Ops, Seen, Table};
use super::{
    Backend, IN_FLIGHT, MAX_RACES, apply_migrations, corrupt, db_error as unavailable, done_by,
    side_pool, token_bytes, token_of, watchdog_pool,
};
use crate::StoreError;
use crate::store::{Begin, Token};

/// The database's clock, in microseconds since 1970, fixed for the statement. `UTC_TIMESTAMP`
/// and a `DATETIME` difference: no session time zone is involved.
const NOW: &str = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";

/// The row (if any) and the database's clock, in one read.
const READ: &str = "SELECT {now} AS now_us, t.state, t.token, t.fence, t.expires_at,
       t.fingerprint, t.output
FROM (SELECT 1 AS one) AS d
LEFT JOIN {table} AS t ON t.scope = ? AND t.idem_key = ?";

/// Claim an absent key. The fence is the clock read just before.
const INSERT: &str = "INSERT INTO {table}
    (scope, idem_key, state, token, fence, expires_at, fingerprint, output, claimed_at, holder)
VALUES (?, ?, 1, ?, ?, {now} + ?, ?, NULL, {now}, ?)";

/// Take over (or renew our own) lease, only if the row is still the one we read (same fence) and
/// still claimable now.
/// (MySQL assigns left to right, each assignment seeing the ones before: `claimed_at` comes first,
/// while `state` and `token` are still the row's.)
const TAKE_OVER: &str = "UPDATE {table}
SET claimed_at = IF(?, claimed_at, {now}),
    state = 1, token = ?, fence = ?, expires_at = {now} + ?, fingerprint = ?, output = NULL,
    holder = ?
WHERE scope = ? AND idem_key = ? AND fence = ?
  AND (state IN (0, 3) OR expires_at <= {now} OR (state = 1 AND token = ?))";

/// Mark done if the token holds the key or nobody else does, with the lease's fingerprint.
const COMPLETE: &str = "UPDATE {table}
SET fingerprint = ?, state = 2, token = ?, expires_at = {now} + ?, output = ?
WHERE scope = ? AND idem_key = ?
  AND ((state = 1 AND token = ?) OR state = 0 OR expires_at <= {now})";

/// A locking read: inside a caller's REPEATABLE READ transaction it sees the latest row, not the
/// transaction's snapshot.
const OWNER: &str = "SELECT state, token FROM {table} WHERE scope = ? AND idem_key = ? FOR UPDATE";

/// Mark done a key whose row was purged.
const INSERT_DONE: &str = "INSERT INTO {table}
    (scope, idem_key, state, token, fence, expires_at, fingerprint, output)
VALUES (?, ?, 2, ?, {now}, {now} + ?, ?, ?)";

/// The row is kept (marked free) so that the next lease's fence continues from this one.
const RELEASE: &str = "UPDATE {table}
SET state = 0, output = NULL, fingerprint = NULL, expires_at = {now}
WHERE scope = ? AND idem_key = ? AND state = 1 AND token = ?";

const EXTEND: &str = "UPDATE {table} SET expires_at = {now} + ?
WHERE scope = ? AND idem_key = ? AND state = 1 AND token = ?";

/// A row whose fence the clock has not passed yet is kept (see the module docs on fences).
const PURGE: &str = "DELETE FROM {table} WHERE expires_at <= {now} AND fence < {now}
ORDER BY expires_at LIMIT ?";

const MIGRATIONS: Migrations = &[
    (
        1,
        "create idem_keys",
        include_str!("../../../migrations/mysql/0001_create_idem_keys.sql"),
    ),
    (
        2,
        "add holder",
        include_str!("../../../migrations/mysql/0002_add_holder.sql"),
    ),
];

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {table}_migrations (
    version BIGINT NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB";

pub struct Sql {
    read: SqlStr,
    insert: SqlStr,
    take_over: SqlStr,
    complete: SqlStr,
    owner: SqlStr,
    insert_done: SqlStr,
    release: SqlStr,
    extend: SqlStr,
    purge: SqlStr,
}

impl Backend for MySql {}

/// The claim itself (see `Ops::begin`): read, then insert or take over.
async fn begin_claim(
    conn: &mut MySqlConnection,
    sql: &Sql,
    claim: &Claim<'_>,
) -> Result<Begin, StoreError> {
    let token = token_bytes(claim.token);
    let fingerprint = claim.fingerprint.as_ref().map(|f| &f[..]);
    for _ in 0..MAX_RACES {
        let row: MySqlRow = sqlx::query(sql.read.clone())
            .bind(claim.at.scope)
            .bind(claim.at.key)
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        let now: i64 = row.try_get(0).map_err(corrupt)?;
        let Some(state) = row.try_get::<Option<i16>, _>(1).map_err(corrupt)? else {
            // Absent: claim it. A concurrent claim of the same key fails on the primary key.
            let sent = std::time::Instant::now();
            let inserted = sqlx::query(sql.insert.clone())
                .bind(claim.at.scope)
                .bind(claim.at.key)
                .bind(&token[..])
                .bind(now)
                .bind(claim.ttl_us)
                .bind(fingerprint)
                .bind(claim.holder)
                .execute(&mut *conn)
                .await;
            match inserted {
                Ok(_) if fresh(conn, sql, claim, sent).await? => {
                    return Ok(Begin::Acquired(claim.lease(now as u64)));
                }
                Ok(_) => continue, // taken over while it waited: look again
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
                Err(e) => return Err(unavailable(e)),
            }
        };
        let read_fence: i64 = row.try_get(3).map_err(corrupt)?;
        let current = Current {
            state,
            token: row.try_get(2).map_err(corrupt)?,
            remaining_us: row.try_get::<i64, _>(4).map_err(corrupt)? - now,
            fingerprint: row.try_get(5).map_err(corrupt)?,
            output: row.try_get(6).map_err(corrupt)?,
        };
        let ours_alive = current.state == IN_FLIGHT
            && current.remaining_us > 0
            && token_of(&current.token)? == claim.token;
        if let Seen::Answer(answer) = current.judge(claim)? {
            return Ok(answer);
        }
        let fence = if ours_alive {
            read_fence
        } else {
            (read_fence + 1).max(now)
        };
        let sent = std::time::Instant::now();
        let taken = sqlx::query(sql.take_over.clone())
            .bind(ours_alive)
            .bind(&token[..])
            .bind(fence)
            .bind(claim.ttl_us)
            .bind(fingerprint)
            .bind(claim.holder)
            .bind(claim.at.scope)
            .bind(claim.at.key)
            .bind(read_fence)
            .bind(&token[..])
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        // The connection reports matched rows (CLIENT_FOUND_ROWS), not only changed ones.
        if taken.rows_affected() == 1 && fresh(conn, sql, claim, sent).await? {
            return Ok(Begin::Acquired(claim.lease(fence as u64)));
        }
    }
    Err(StoreError::unavailable(
        "begin kept racing with concurrent claims of the same key",
    ))
}

/// MySQL/MariaDB's "Lock wait timeout exceeded" (1205).
fn is_lock_wait_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<sqlx::Error>().is_some_and(|e| {
        matches!(e, sqlx::Error::Database(d) if d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|m| m.number() == 1205))
    })
}

/// Whether the lease just claimed by a statement sent at `sent` is fresh. The statement's clock
/// (`UTC_TIMESTAMP`) was read when it started, before any wait for a row lock (a purge, another
/// claim), so a statement that took long may have granted a lease that is mostly or wholly
/// over: while one took more than a quarter of the ttl, the lease is renewed by a new statement
/// (up to three times). `false`: another claim took the key meanwhile.
async fn fresh(
    conn: &mut MySqlConnection,
    sql: &Sql,
    claim: &Claim<'_>,
    mut sent: std::time::Instant,
) -> Result<bool, StoreError> {
    let slow = std::time::Duration::from_micros(claim.ttl_us.unsigned_abs() / 4);
    for _ in 0..3 {
        if sent.elapsed() <= slow {
            return Ok(true);
        }
        sent = std::time::Instant::now();
        let renewed = sqlx::query(sql.extend.clone())
            .bind(claim.ttl_us)
            .bind(claim.at.scope)
            .bind(claim.at.key)
            .bind(&token_bytes(claim.token)[..])
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        if renewed.rows_affected() != 1 {
            return Ok(false);
        }
    }
    Err(StoreError::unavailable(
        "the claim's lease keeps ending while it is granted (row locks held for longer than its ttl)",
    ))
}

#[async_trait::async_trait]
impl Ops for MySql {
    type Sql = Sql;
    const MIGRATIONS: Migrations = MIGRATIONS;
    const MIGRATIONS_TABLE: &'static str = MIGRATIONS_TABLE;
    const NOW: &'static str = NOW;
    // InnoDB has no transaction-scoped lock that can be tried without waiting for a key that has
    // no row yet: the claim is a lease on another connection, renewed by the watchdog, and the
    // mark (an `UPDATE`, which reads the latest row at every isolation level) checks its token.
    const CLAIMS_IN_TX: bool = false;
    const CLAIM_LOCKS_DATABASE: bool = false;
    fn side_pool(pool: &Pool<MySql>) -> Option<Pool<MySql>> {
        Some(side_pool(pool))
    }

    async fn in_transaction(conn: &mut MySqlConnection) -> Result<Option<bool>, StoreError> {
        // MariaDB has the variable; MySQL does not (an error: it cannot say).
        match sqlx::query_scalar::<_, u64>("SELECT @@in_transaction")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(v) => Ok(Some(v != 0)),
            Err(sqlx::Error::Database(_)) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn peek(
        conn: &mut MySqlConnection,
        sql: &Sql,
        at: &At<'_>,
    ) -> Result<Option<Current>, StoreError> {
        let row: MySqlRow = sqlx::query(sql.read.clone())
            .bind(at.scope)
            .bind(at.key)
            .fetch_one(&mut *conn)
            .await
            .map_err(unavailable)?;
        let now: i64 = row.try_get(0).map_err(corrupt)?;
        let Some(state) = row.try_get::<Option<i16>, _>(1).map_err(corrupt)? else {
            return Ok(None);
        };
        Ok(Some(Current {
            state,
            token: row.try_get(2).map_err(corrupt)?,
            remaining_us: row.try_get::<i64, _>(4).map_err(corrupt)? - now,
            fingerprint: row.try_get(5).map_err(corrupt)?,
            output: row.try_get(6).map_err(corrupt)?,
        }))
    }

    fn watchdog_pool(pool: &Pool<MySql>) -> Option<Pool<MySql>> {
        // Its connections are bound to the runtime that opened them: the watchdog's own.
        Some(watchdog_pool(pool, 4))
    }

    fn prepare(t: &Table) -> Sql {
        Sql {
            read: t.fill(READ, NOW),
            insert: t.fill(INSERT, NOW),
            take_over: t.fill(TAKE_OVER, NOW),
            complete: t.fill(COMPLETE, NOW),
            owner: t.fill(OWNER, NOW),
            insert_done: t.fill(INSERT_DONE, NOW),
            release: t.fill(RELEASE, NOW),
            extend: t.fill(EXTEND, NOW),
            purge: t.fill(PURGE, NOW),
        }
    }

    async fn migrate(pool: &Pool<MySql>, t: &Table) -> Result<(), sqlx::Error> {
        // DDL commits implicitly in MySQL, so a named lock (held by this connection) serialises
        // concurrent start-ups instead of a transaction. The statements are idempotent.
        let mut conn = pool.acquire().await?;
        let lock = format!("idem_runtime migrate {}", t.qualified);
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
            .bind(&lock)
            .fetch_one(&mut *conn)
            .await?;
        if got != Some(1) {
            return Err(sqlx::Error::Protocol(format!(
                "could not take the migration lock {lock:?} within 60 s"
            )));
        }
        let result = async {
            apply_migrations::<MySql>(
                &mut *conn,
                t,
                NOW,
                Self::MIGRATIONS,
                MIGRATIONS_TABLE,
                "INSERT INTO {table}_migrations (version, name) VALUES (?, ?)",
            )
            .await
        }
        .await;
        let released = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&lock)
            .execute(&mut *conn)
            .await;
        result.and(released.map(|_| ()))
    }

    async fn begin(
        conn: &mut MySqlConnection,
        sql: &Sql,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        if claim.brief_lock_wait {
            // The claim of a transaction made on another connection: if that very transaction
            // holds the key's row (it marked the key done, uncommitted), waiting would last its
            // whole `innodb_lock_wait_timeout` (50 s by default). A second's wait, then "in flight".
            sqlx::raw_sql("SET SESSION innodb_lock_wait_timeout = 1")
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
        }
        match begin_claim(conn, sql, claim).await {
            Err(StoreError::Unavailable(e))
                if claim.brief_lock_wait && is_lock_wait_timeout(&*e) =>
            {
                // The wait may have come after the claim was made (renewing it): give it back
                // (token-checked, so harmless if it was not), as nobody will run it.
                let at = At {
                    scope: claim.at.scope,
                    key: claim.at.key,
                };
                let _ = Self::release(conn, sql, &at, claim.token).await;
                Ok(Begin::InFlight {
                    retry_after: claim.retry_hint(),
                })
            }
            other => other,
        }
    }

    /// Not used: MySQL claims outside the transaction (see `CLAIMS_IN_TX`).
    async fn begin_in(
        conn: &mut MySqlConnection,
        sql: &Sql,
        _table: &Table,
        claim: &Claim<'_>,
    ) -> Result<Begin, StoreError> {
        Self::begin(conn, sql, claim).await
    }

    async fn raw(conn: &mut MySqlConnection, sql: String) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map(|_| ())
    }

    async fn complete(
        conn: &mut MySqlConnection,
        sql: &Sql,
        mark: &Mark<'_>,
    ) -> Result<(), StoreError> {
        let token = token_bytes(mark.token);
        for _ in 0..MAX_RACES {
            let fingerprint = mark.fingerprint.as_ref().map(|f| &f[..]);
            let written = sqlx::query(sql.complete.clone())
                .bind(fingerprint)
                .bind(&token[..])
                .bind(mark.keep_us)
                .bind(mark.output)
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .bind(&token[..])
                .execute(&mut *conn)
                .await
                .map_err(unavailable)?;
            if written.rows_affected() == 1 {
                return Ok(());
            }
            let row: Option<(i16, Vec<u8>)> = sqlx::query_as(sql.owner.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            if row.is_some() {
                return done_by(row, mark.token);
            }
            // Purged: nobody owns the key, so record the effect.
            let inserted = sqlx::query(sql.insert_done.clone())
                .bind(mark.at.scope)
                .bind(mark.at.key)
                .bind(&token[..])
                .bind(mark.keep_us)
                .bind(fingerprint)
                .bind(mark.output)
                .execute(&mut *conn)
                .await;
            match inserted {
                Ok(_) => return Ok(()),
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(StoreError::unavailable(
            "complete kept racing with concurrent claims of the same key",
        ))
    }

    async fn release(
        conn: &mut MySqlConnection,
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
        conn: &mut MySqlConnection,
        sql: &Sql,
        at: &At<'_>,
        token: Token,
        ttl_us: i64,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(sql.extend.clone())
            .bind(ttl_us)
            .bind(at.scope)
            .bind(at.key)
            .bind(&token_bytes(token)[..])
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    async fn purge_batch(
        conn: &mut MySqlConnection,
        sql: &Sql,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(sql.purge.clone())
            .bind(limit)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }
}
