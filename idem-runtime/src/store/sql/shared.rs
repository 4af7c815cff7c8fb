//! What the backends share: row states, encodings, error mapping, and the statements of the
//! backends with `RETURNING` (PostgreSQL, SQLite).

use std::borrow::Cow;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::StoreError;
use crate::store::Token;

/// The `Ops` impl of a backend with `RETURNING` (PostgreSQL, SQLite): `release`, `extend`,
/// `peek` and `purge_batch` are the same statements, bound the same way, on both (`complete` is
/// each backend's: PostgreSQL's also runs on a caller's transaction of another library); only the
/// connection type differs. The backend's own items are passed in. Names in the bodies (`Sql`,
/// `unavailable`, `done_by`, ...) resolve in the invoking backend's module.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
macro_rules! returning_ops {
    (impl Ops for $db:ty, $conn:ty { $($items:tt)* }) => {
        #[async_trait::async_trait]
        impl Ops for $db {
        $($items)*
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

        async fn in_transaction(_conn: &mut $conn) -> Result<Option<bool>, StoreError> {
            // PostgreSQL refuses a savepoint outside a transaction; SQLite begins one.
            Ok(None)
        }

        async fn peek(
            conn: &mut $conn,
            sql: &Sql,
            at: &At<'_>,
        ) -> Result<Option<Current>, StoreError> {
            type Row = (i16, Vec<u8>, i64, i64, Option<Vec<u8>>, Option<Vec<u8>>);
            let row: Option<Row> = sqlx::query_as(sql.read.clone())
                .bind(at.scope)
                .bind(at.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(unavailable)?;
            Ok(row.map(|(state, token, _fence, remaining_us, fingerprint, output)| Current {
                state,
                token,
                remaining_us,
                fingerprint,
                output,
            }))
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

/// The row states.
pub(crate) const FREE: i16 = 0;
pub(crate) const IN_FLIGHT: i16 = 1;
pub(crate) const DONE: i16 = 2;
/// Freed by an operator (`forget`, `release_stuck`): claimable like a free key, but a late done
/// mark of the holder before is refused (see `store::ops`).
pub(crate) const FORGOTTEN: i16 = 3;

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

/// The scope as stored: itself, or `sha256:<hex>` of it when it is too long for the column, when
/// it contains NUL (refused by PostgreSQL's text), or when it already reads `sha256:...` (so a
/// short scope can never spell, and share the records of, a hashed long one).
pub(crate) fn stored_scope(scope: &str) -> Cow<'_, str> {
    if scope.len() <= MAX_SCOPE_LEN && !scope.starts_with("sha256:") && !scope.contains('\0') {
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
/// What a mark in the claim's own transaction answers when the claim's row is not there: the
/// transaction was ended under the call (a handler that rolled it back itself).
pub(crate) fn claim_gone() -> StoreError {
    StoreError::TransactionGone(
        "the claim made in this transaction is gone: the transaction was ended under the call (a handler that rolled it back itself?)".into(),
    )
}

pub(crate) fn done_by(row: Option<(i16, Vec<u8>)>, token: Token) -> Result<(), StoreError> {
    match row {
        Some((DONE, t)) if token_of(&t)? == token => Ok(()),
        Some((FREE | IN_FLIGHT | DONE | FORGOTTEN, _)) | None => Err(StoreError::LeaseLost),
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

/// A pool of at most `max` connections with `pool`'s settings (its connect options and its hooks,
/// such as an `after_connect` that sets the schema) for the watchdog's thread: it connects
/// lazily, so its connections are opened (and bound to the runtime) there; it keeps no minimum,
/// so it runs no maintenance task on a runtime that is not the watchdog's.
pub(crate) fn watchdog_pool<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, max: u32) -> sqlx::Pool<DB> {
    let options = pool.options().clone();
    // No larger than the application's pool: a pool made by `#[sqlx::test]` shares a parent's
    // connection budget (copied with the options), which panics on a larger child.
    let max = max.min(options.get_max_connections()).max(1);
    options
        .max_connections(max)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// A pool with `pool`'s settings and size, connecting lazily, for the work the transactional form
/// does outside the caller's transaction (see `SqlStore::side`). It keeps no minimum, so it
/// costs nothing until used. (SQLite's opens its connections its own way: `side_pool_with`.)
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn side_pool<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> sqlx::Pool<DB> {
    side_pool_with(pool, (*pool.connect_options()).clone())
}

/// [`side_pool`] whose connections are opened with `connect` (the application's, adjusted).
pub(crate) fn side_pool_with<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    connect: <DB::Connection as sqlx::Connection>::Options,
) -> sqlx::Pool<DB> {
    let options = pool.options().clone();
    let max = options.get_max_connections().max(1);
    options
        .max_connections(max)
        .min_connections(0)
        // Its connections close when idle: it is used by bursts of transactional calls.
        .idle_timeout(Some(std::time::Duration::from_secs(60)))
        .max_lifetime(None)
        .connect_lazy_with(connect)
}

#[cfg(feature = "postgres")]
/// The key of the transaction-scoped advisory lock that stands for `(table, scope, key)`:
/// 64 bits of their SHA-256.
pub(crate) fn advisory_key(table: &str, scope: &str, key: &str) -> i64 {
    let mut h = Sha256::new();
    for part in ["idem", table, scope, key] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The migrations not yet recorded in `{table}_migrations`, applied and recorded on `conn`, under
/// whatever lock the caller holds. `record` inserts (version, name) with the backend's placeholders.
pub(crate) async fn apply_migrations<DB>(
    conn: &mut DB::Connection,
    t: &super::sealed::Table,
    now: &str,
    migrations: super::sealed::Migrations,
    migrations_table: &str,
    record: &str,
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    sqlx::raw_sql(t.fill(migrations_table, now))
        .execute(&mut *conn)
        .await?;
    let applied: Vec<i64> =
        sqlx::query_scalar(t.fill("SELECT version FROM {table}_migrations", now))
            .fetch_all(&mut *conn)
            .await?;
    for &(version, name, sql) in migrations {
        if applied.contains(&version) {
            continue;
        }
        for statement in statements(sql) {
            sqlx::raw_sql(t.fill(statement, now))
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query(t.fill(record, now))
            .bind(version)
            .bind(name)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::sealed::Table;

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
        // A short scope that spells a hashed one is hashed again: never the same text.
        let spelled = stored_scope(&a).into_owned();
        assert_ne!(stored_scope(&spelled), spelled);
        assert!(stored_scope("a\0b").starts_with("sha256:"));
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
