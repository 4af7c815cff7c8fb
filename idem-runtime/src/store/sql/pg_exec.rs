//! What the PostgreSQL store's statements run over: idem's own sqlx connection, or a caller's
//! transaction of another library ([`PgTransaction`]). The claim, the mark and their retries are
//! written once, over [`PgExec`], and run on both.

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Column, PgConnection, Row as _, TypeInfo, ValueRef};

use super::{corrupt, db_error};
use crate::StoreError;
use crate::pg_tx::{Param, PgError, PgTransaction, Row, Value};

/// A connection the PostgreSQL store can run its statements on.
#[async_trait::async_trait]
pub(crate) trait PgExec: Send {
    /// Run one statement; the rows it wrote.
    async fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;
    /// Run one statement; its rows.
    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;

    /// Run one statement; its first row, if any.
    async fn row(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }
}

#[async_trait::async_trait]
impl PgExec for PgConnection {
    async fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        let done = bound(sql, params)
            .execute(&mut *self)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let rows = bound(sql, params)
            .fetch_all(&mut *self)
            .await
            .map_err(db_error)?;
        rows.iter().map(row_of).collect()
    }
}

#[async_trait::async_trait]
impl PgExec for dyn PgTransaction + '_ {
    async fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        self.execute(sql, params).await.map_err(pg_error)
    }

    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        self.query(sql, params).await.map_err(pg_error)
    }
}

/// A statement with its parameters bound, on idem's sqlx.
fn bound<'q>(
    sql: &str,
    params: &[Param<'_>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
    for p in params {
        q = match *p {
            Param::Text(v) => q.bind(v),
            Param::Bytes(v) => q.bind(v),
            Param::I64(v) => q.bind(v),
            Param::Bool(v) => q.bind(v),
        };
    }
    q
}

/// A row of idem's sqlx as a [`Row`]: only the column types idem's statements return.
fn row_of(r: &PgRow) -> Result<Row, StoreError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        if r.try_get_raw(i).map_err(corrupt)?.is_null() {
            values.push(Value::Null);
            continue;
        }
        values.push(match col.type_info().name() {
            "BOOL" => Value::Bool(r.try_get(i).map_err(corrupt)?),
            "INT2" => Value::Int(r.try_get::<i16, _>(i).map_err(corrupt)?.into()),
            "INT4" => Value::Int(r.try_get::<i32, _>(i).map_err(corrupt)?.into()),
            "INT8" => Value::Int(r.try_get(i).map_err(corrupt)?),
            "TEXT" | "VARCHAR" | "NAME" => Value::Text(r.try_get(i).map_err(corrupt)?),
            "BYTEA" => Value::Bytes(r.try_get(i).map_err(corrupt)?),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "column {i} is of type {other}, which idem does not read"
                )));
            }
        });
    }
    Ok(Row::new(values))
}

/// The table does not exist: say what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("the idempotency table does not exist: call SqlStore::migrate() at start-up ({0})")]
struct MissingTable(PgError);

/// A foreign transaction's error, mapped as [`db_error`] maps sqlx's.
pub(crate) fn pg_error(e: PgError) -> StoreError {
    if e.code() == Some("42P01") {
        return StoreError::Unavailable(Box::new(MissingTable(e)));
    }
    StoreError::Unavailable(Box::new(e))
}

/// Reading idem's columns out of a [`Row`].
impl Row {
    pub(crate) fn bool_at(&mut self, i: usize) -> Result<bool, StoreError> {
        match self.take(i).map_err(StoreError::Corrupt)? {
            Value::Bool(b) => Ok(b),
            other => Err(unexpected(i, "a boolean", &other)),
        }
    }

    pub(crate) fn int_at(&mut self, i: usize) -> Result<i64, StoreError> {
        match self.take(i).map_err(StoreError::Corrupt)? {
            Value::Int(v) => Ok(v),
            other => Err(unexpected(i, "an integer", &other)),
        }
    }

    pub(crate) fn opt_int_at(&mut self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.take(i).map_err(StoreError::Corrupt)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(v)),
            other => Err(unexpected(i, "an integer", &other)),
        }
    }

    pub(crate) fn small_at(&mut self, i: usize) -> Result<i16, StoreError> {
        let v = self.int_at(i)?;
        i16::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {i}: {v} is no state")))
    }

    pub(crate) fn opt_bytes_at(&mut self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.take(i).map_err(StoreError::Corrupt)? {
            Value::Null => Ok(None),
            Value::Bytes(b) => Ok(Some(b)),
            other => Err(unexpected(i, "bytes", &other)),
        }
    }

    pub(crate) fn bytes_at(&mut self, i: usize) -> Result<Vec<u8>, StoreError> {
        self.opt_bytes_at(i)?
            .ok_or_else(|| StoreError::Corrupt(format!("column {i} is NULL")))
    }
}

fn unexpected(i: usize, wanted: &str, got: &Value) -> StoreError {
    StoreError::Corrupt(format!("column {i}: wanted {wanted}, got {got:?}"))
}
