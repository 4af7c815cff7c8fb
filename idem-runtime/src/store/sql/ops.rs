//! The operations on the SQL store's records (see [`Operations`]): inspect, list (paged by the
//! primary key), counts, forget and release a stuck key. The statements of each database are
//! here, behind [`Admin`]; the store's own claim and mark are in the backends' files.

#![allow(unreachable_pub)]

use std::time::Duration;

use sqlx::Row;

use super::sealed::Table;
use super::{Backend, DONE, FORGOTTEN, IN_FLIGHT, SqlStore, db_error, micros, stored_scope};
use crate::store::ops::{
    Allowed, Changed, Counts, FORGOTTEN_RETENTION, KeyState, ListQuery, Listed, Operations, Page,
    wanted,
};
use crate::{Key, StoreError};

/// How many rows one page of `list` reads at most, per record it may return: pages stay cheap
/// however few of the rows match the filter.
const SCAN_PER_RECORD: usize = 4;

/// A row as the operations see it.
pub struct AdminRow {
    pub state: i16,
    pub fence: i64,
    pub remaining_us: i64,
    pub fingerprint: bool,
    pub output_bytes: i64,
    /// The output's first byte (its format tag), if any.
    pub output_tag: Option<u8>,
    /// How long ago the lease was taken (rows written since migration 2).
    pub held_us: Option<i64>,
    pub holder: Option<String>,
}

impl AdminRow {
    fn state(self) -> KeyState {
        let us = |v: i64| Duration::from_micros(v.max(0).unsigned_abs());
        match self.state {
            IN_FLIGHT => KeyState::InFlight {
                fence: self.fence as u64,
                lease_left: us(self.remaining_us),
                lapsed: self.remaining_us <= 0,
                held_for: self.held_us.map(us),
                holder: self.holder,
            },
            DONE if self.remaining_us > 0 => KeyState::Done {
                fence: Some(self.fence as u64),
                kept_for: us(self.remaining_us),
                fingerprint: self.fingerprint,
                output_bytes: self.output_bytes.max(0) as u64,
                replayable: self
                    .output_tag
                    .is_some_and(|t| !crate::codec::is_unreplayable(&[t])),
            },
            // Done past its keep: a begin sees an absent key (a purge deletes it).
            DONE => KeyState::Absent,
            FORGOTTEN => KeyState::Free {
                fence: self.fence as u64,
                forgotten: true,
            },
            // Free, or a state a later version wrote.
            _ => KeyState::Free {
                fence: self.fence as u64,
                forgotten: false,
            },
        }
    }
}

/// The operations' statements of one database. Sealed with the rest.
#[async_trait::async_trait]
pub trait Admin: sqlx::Database + Sized {
    async fn inspect_row(
        conn: &mut Self::Connection,
        table: &Table,
        scope: &str,
        key: &str,
    ) -> Result<Option<AdminRow>, StoreError>;
    /// Up to `scan` rows of `scope` after the key `after`, by key.
    async fn list_rows(
        conn: &mut Self::Connection,
        table: &Table,
        scope: &str,
        after: &str,
        scan: i64,
    ) -> Result<Vec<(String, AdminRow)>, StoreError>;
    /// Leave the forgotten record (fence advanced) if the row is in a state `allowed` permits;
    /// its new fence, or `None` when no row was changed.
    async fn forget_row(
        conn: &mut Self::Connection,
        table: &Table,
        scope: &str,
        key: &str,
        allowed: Allowed,
        retention_us: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// (state, alive, count) of the scope's rows.
    async fn count_rows(
        conn: &mut Self::Connection,
        table: &Table,
        scope: &str,
    ) -> Result<Vec<(i16, bool, i64)>, StoreError>;
}

/// The columns every operation reads, after the key.
const COLUMNS: &str = "state, fence, expires_at - {now}, fingerprint IS NOT NULL, {len}, {tag}, \
     {now} - claimed_at, holder";

fn tag_of(bytes: Option<Vec<u8>>) -> Option<u8> {
    bytes.and_then(|b| b.first().copied())
}

/// An implementation of [`Admin`] for one database: its clock, its byte functions, its
/// placeholders, and how its rows decode (`$fp`: the type a boolean expression decodes as).
macro_rules! admin {
    ($db:ty, $now:expr, $len:expr, $tag:expr, $p:expr, $fp:ty, $key:ty, $holder:ty) => {
        #[async_trait::async_trait]
        impl Admin for $db {
            async fn inspect_row(
                conn: &mut <$db as sqlx::Database>::Connection,
                table: &Table,
                scope: &str,
                key: &str,
            ) -> Result<Option<AdminRow>, StoreError> {
                let sql = format!(
                    "SELECT {COLUMNS} FROM {{table}} WHERE scope = {} AND idem_key = {}",
                    $p(1),
                    $p(2)
                )
                .replace("{len}", $len)
                .replace("{tag}", $tag);
                let row = sqlx::query(table.fill(&sql, $now))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db_error)?;
                row.map(|r| decode(&r, 0)).transpose()
            }

            async fn list_rows(
                conn: &mut <$db as sqlx::Database>::Connection,
                table: &Table,
                scope: &str,
                after: &str,
                scan: i64,
            ) -> Result<Vec<(String, AdminRow)>, StoreError> {
                let sql = format!(
                    "SELECT idem_key, {COLUMNS} FROM {{table}} WHERE scope = {} AND idem_key > {} \
                     ORDER BY idem_key LIMIT {}",
                    $p(1),
                    $p(2),
                    $p(3)
                )
                .replace("{len}", $len)
                .replace("{tag}", $tag);
                let rows = sqlx::query(table.fill(&sql, $now))
                    .bind(scope)
                    .bind(after)
                    .bind(scan)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        let key: $key = r.try_get(0).map_err(db_error)?;
                        Ok((key_text(key), decode(r, 1)?))
                    })
                    .collect()
            }

            async fn forget_row(
                conn: &mut <$db as sqlx::Database>::Connection,
                table: &Table,
                scope: &str,
                key: &str,
                allowed: Allowed,
                retention_us: i64,
            ) -> Result<Option<i64>, StoreError> {
                // The fence first: MySQL assigns left to right. A zero token is nobody's. The
                // placeholders are numbered in the order they appear (MySQL's are positional).
                let sql = format!(
                    "UPDATE {{table}} SET fence = {greatest}(fence + 1, {{now}}), state = 3, \
                     token = {zero}, expires_at = {{now}} + {ret}, output = NULL, \
                     fingerprint = NULL, holder = NULL \
                     WHERE scope = {s} AND idem_key = {k} \
                     AND ((state = 2 AND expires_at > {{now}} AND {done} = 1) \
                       OR (state = 1 AND (expires_at <= {{now}} OR {live} = 1)))",
                    greatest = greatest::<$db>(),
                    zero = $p(1),
                    ret = $p(2),
                    s = $p(3),
                    k = $p(4),
                    done = $p(5),
                    live = $p(6),
                );
                let changed = sqlx::query(table.fill(&sql, $now))
                    .bind(&[0u8; 16][..])
                    .bind(retention_us)
                    .bind(scope)
                    .bind(key)
                    .bind(i64::from(allowed.done))
                    .bind(i64::from(allowed.live))
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
                if changed_rows(&changed) == 0 {
                    return Ok(None);
                }
                let fence: Option<i64> = sqlx::query_scalar(table.fill(
                    &format!(
                        "SELECT fence FROM {{table}} WHERE scope = {} AND idem_key = {} AND state = 3",
                        $p(1),
                        $p(2)
                    ),
                    $now,
                ))
                .bind(scope)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
                Ok(fence)
            }

            async fn count_rows(
                conn: &mut <$db as sqlx::Database>::Connection,
                table: &Table,
                scope: &str,
            ) -> Result<Vec<(i16, bool, i64)>, StoreError> {
                let sql = format!(
                    "SELECT state, CASE WHEN expires_at > {{now}} THEN 1 ELSE 0 END AS alive, \
                     COUNT(*) FROM {{table}} WHERE scope = {} GROUP BY state, alive",
                    $p(1)
                );
                let rows = sqlx::query(table.fill(&sql, $now))
                    .bind(scope)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        let state: i16 = r.try_get(0).map_err(db_error)?;
                        let alive = r
                            .try_get::<i64, _>(1)
                            .or_else(|_| r.try_get::<i32, _>(1).map(i64::from))
                            .map_err(db_error)?;
                        let n: i64 = r.try_get(2).map_err(db_error)?;
                        Ok((state, alive == 1, n))
                    })
                    .collect()
            }
        }

        fn decode(r: &<$db as sqlx::Database>::Row, at: usize) -> Result<AdminRow, StoreError> {
            let fp: $fp = r.try_get(at + 3).map_err(db_error)?;
            let holder: Option<$holder> = r.try_get(at + 7).map_err(db_error)?;
            Ok(AdminRow {
                state: r.try_get(at).map_err(db_error)?,
                fence: r.try_get(at + 1).map_err(db_error)?,
                remaining_us: r.try_get(at + 2).map_err(db_error)?,
                fingerprint: fp.into_bool(),
                output_bytes: r.try_get(at + 4).map_err(db_error)?,
                output_tag: tag_of(r.try_get(at + 5).map_err(db_error)?),
                held_us: r.try_get(at + 6).map_err(db_error)?,
                holder: holder.map(key_text),
            })
        }
    };
}

/// A boolean read back: PostgreSQL's `bool`, or the others' integers.
trait IntoBool {
    fn into_bool(self) -> bool;
}
impl IntoBool for bool {
    fn into_bool(self) -> bool {
        self
    }
}
impl IntoBool for i64 {
    fn into_bool(self) -> bool {
        self != 0
    }
}
impl IntoBool for i32 {
    fn into_bool(self) -> bool {
        self != 0
    }
}

/// Text read back: a string, or bytes (MySQL keeps keys and holders as binary).
trait KeyText {
    fn text(self) -> String;
}
impl KeyText for String {
    fn text(self) -> String {
        self
    }
}
impl KeyText for Vec<u8> {
    fn text(self) -> String {
        String::from_utf8_lossy(&self).into_owned()
    }
}
fn key_text<T: KeyText>(t: T) -> String {
    t.text()
}

/// The number of rows a statement changed (matched, on MySQL's connection).
fn changed_rows<R: RowsAffected>(r: &R) -> u64 {
    r.rows()
}
trait RowsAffected {
    fn rows(&self) -> u64;
}

/// `GREATEST` is `max` in SQLite.
fn greatest<DB: sqlx::Database>() -> &'static str {
    if DB::NAME == "SQLite" {
        "max"
    } else {
        "GREATEST"
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    impl RowsAffected for sqlx::postgres::PgQueryResult {
        fn rows(&self) -> u64 {
            self.rows_affected()
        }
    }
    fn p(n: usize) -> String {
        format!("${n}")
    }
    admin!(
        sqlx::Postgres,
        "(extract(epoch from statement_timestamp()) * 1000000)::bigint",
        "COALESCE(length(output), 0)::bigint",
        "substring(output from 1 for 1)",
        p,
        bool,
        String,
        String
    );
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    impl RowsAffected for sqlx::mysql::MySqlQueryResult {
        fn rows(&self) -> u64 {
            self.rows_affected()
        }
    }
    fn p(_: usize) -> String {
        "?".to_owned()
    }
    admin!(
        sqlx::MySql,
        "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))",
        "CAST(COALESCE(LENGTH(output), 0) AS SIGNED)",
        "LEFT(output, 1)",
        p,
        i64,
        Vec<u8>,
        Vec<u8>
    );
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
        fn rows(&self) -> u64 {
            self.rows_affected()
        }
    }
    fn p(n: usize) -> String {
        format!("?{n}")
    }
    admin!(
        sqlx::Sqlite,
        "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)",
        "COALESCE(length(output), 0)",
        "substr(output, 1, 1)",
        p,
        i64,
        String,
        String
    );
}

impl<DB: Backend> SqlStore<DB> {
    async fn change(
        &self,
        scope: &str,
        key: &Key,
        allowed: Allowed,
    ) -> Result<Changed, StoreError> {
        let scope = stored_scope(scope);
        let mut conn = self.acquire().await?;
        let table = &self.inner.table;
        let retention = micros(FORGOTTEN_RETENTION);
        if let Some(fence) =
            DB::forget_row(&mut conn, table, &scope, key.as_str(), allowed, retention).await?
        {
            return Ok(Changed::Freed {
                fence: fence as u64,
            });
        }
        // Nothing changed: say why, from the row as it is now.
        let state = DB::inspect_row(&mut conn, table, &scope, key.as_str())
            .await?
            .map_or(KeyState::Absent, AdminRow::state);
        match allowed.check(state) {
            Err(answer) => Ok(answer),
            // It became changeable between the two statements: a caller may try again.
            Ok(()) => Err(StoreError::unavailable(
                "the key changed while it was being forgotten: try again",
            )),
        }
    }
}

#[async_trait::async_trait]
impl<DB: Backend> Operations for SqlStore<DB> {
    async fn inspect(&self, scope: &str, key: &Key) -> Result<KeyState, StoreError> {
        let scope = stored_scope(scope);
        let mut conn = self.acquire().await?;
        Ok(
            DB::inspect_row(&mut conn, &self.inner.table, &scope, key.as_str())
                .await?
                .map_or(KeyState::Absent, AdminRow::state),
        )
    }

    /// By key, within the scope (the primary key's order); the cursor is the last key read.
    async fn list(&self, scope: &str, query: &ListQuery) -> Result<Page, StoreError> {
        let scope = stored_scope(scope);
        let after = query.cursor.clone().unwrap_or_default();
        let scan = query.limit.max(1).saturating_mul(SCAN_PER_RECORD);
        let mut conn = self.acquire().await?;
        let rows = DB::list_rows(&mut conn, &self.inner.table, &scope, &after, scan as i64).await?;
        let next = (rows.len() == scan)
            .then(|| rows.last().map(|(k, _)| k.clone()))
            .flatten();
        let records = rows
            .into_iter()
            .map(|(key, row)| Listed {
                key,
                state: row.state(),
            })
            .filter(|l| wanted(&l.state, query))
            .take(query.limit)
            .collect::<Vec<_>>();
        // A full page ends at its last record, so that none after it is skipped.
        let next = if records.len() == query.limit {
            records.last().map(|l| l.key.clone())
        } else {
            next
        };
        Ok(Page { records, next })
    }

    async fn counts(&self, scope: &str) -> Result<Counts, StoreError> {
        let scope = stored_scope(scope);
        let mut conn = self.acquire().await?;
        let mut counts = Counts::default();
        for (state, alive, n) in DB::count_rows(&mut conn, &self.inner.table, &scope).await? {
            let n = n.max(0) as u64;
            match (state, alive) {
                (IN_FLIGHT, true) => counts.in_flight += n,
                (IN_FLIGHT, false) => counts.lapsed += n,
                (DONE, true) => counts.done += n,
                _ => counts.free += n,
            }
        }
        Ok(counts)
    }

    async fn forget(&self, scope: &str, key: &Key, force: bool) -> Result<Changed, StoreError> {
        self.change(scope, key, Allowed::forget(force)).await
    }

    async fn release_stuck(
        &self,
        scope: &str,
        key: &Key,
        force: bool,
    ) -> Result<Changed, StoreError> {
        self.change(scope, key, Allowed::release(force)).await
    }
}
