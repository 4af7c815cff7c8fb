//! [`PgTransaction`] for sqlx 0.8 on PostgreSQL (feature `sqlx-0-8`; idem itself is built on
//! sqlx 0.9, a different crate to rustc).

use sqlx08::postgres::{PgArguments, PgRow};
use sqlx08::{Column, Row as _, TypeInfo, ValueRef};

use super::{Param, PgError, PgFuture, PgTransaction, Row, Value};

/// A sqlx 0.8 `PgConnection` runs idem's statements; as the transaction parameter it must be
/// inside a transaction (`BEGIN` sent through sqlx), and a `Transaction<'_, Postgres>` (what
/// `pool.begin()` gives) always is.
///
/// ```no_run
/// # async fn demo(pool: sqlx08::PgPool) -> Result<(), sqlx08::Error> {
/// use idem_runtime::{Param, PgTransaction};
/// let mut tx = pool.begin().await?;
/// let rows = PgTransaction::query(&mut *tx, "SELECT $1::bigint", &[Param::I64(Some(1))]).await;
/// assert_eq!(rows.unwrap().len(), 1);
/// tx.commit().await
/// # }
/// ```
impl PgTransaction for sqlx08::PgConnection {
    fn execute<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, u64> {
        Box::pin(async move {
            // Through `Executor` itself: the query types' own `execute`, generic over the
            // executor, is not `Send` in a boxed future (a higher-ranked bound rustc cannot
            // prove).
            let conn: &mut sqlx08::PgConnection = self;
            let done = if params.is_empty() {
                // idem's parameterless statements (savepoints, each of its own name): the
                // simple protocol, so that none is kept in the prepared-statement cache.
                sqlx08::Executor::execute(conn, sqlx08::raw_sql(sql)).await
            } else {
                sqlx08::Executor::execute(conn, bound(sql, params)).await
            };
            done.map(|d| d.rows_affected()).map_err(error)
        })
    }

    fn query<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>> {
        Box::pin(async move {
            let rows = bound(sql, params)
                .fetch_all(&mut *self)
                .await
                .map_err(error)?;
            rows.iter().map(row_of).collect()
        })
    }

    fn in_transaction(&self) -> Option<bool> {
        Some(sqlx08::Connection::is_in_transaction(self))
    }

    fn library(&self) -> &'static str {
        "sqlx 0.8"
    }
}

/// A sqlx 0.8 `Transaction<'_, Postgres>`: its connection (see the `PgConnection` impl).
impl PgTransaction for sqlx08::Transaction<'_, sqlx08::Postgres> {
    fn execute<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, u64> {
        PgTransaction::execute(&mut **self, sql, params)
    }

    fn query<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>> {
        PgTransaction::query(&mut **self, sql, params)
    }

    fn in_transaction(&self) -> Option<bool> {
        Some(true)
    }

    fn library(&self) -> &'static str {
        "sqlx 0.8"
    }
}

/// A sqlx 0.8 `&mut Transaction<'_, Postgres>` as the transaction parameter of
/// `#[idempotent(tx = "tx")]`.
impl crate::TxConnection for sqlx08::Transaction<'_, sqlx08::Postgres> {
    fn as_tx(&mut self) -> (crate::TxRef<'_>, bool) {
        (crate::TxRef::Pg(self), true)
    }
}

/// A sqlx 0.8 `&mut PgConnection` inside a transaction as the transaction parameter.
impl crate::TxConnection for sqlx08::PgConnection {
    fn as_tx(&mut self) -> (crate::TxRef<'_>, bool) {
        let in_tx = sqlx08::Connection::is_in_transaction(self);
        (crate::TxRef::Pg(self), in_tx)
    }
}

fn bound<'a>(
    sql: &'a str,
    params: &'a [Param<'a>],
) -> sqlx08::query::Query<'a, sqlx08::Postgres, PgArguments> {
    let mut q = sqlx08::query(sql);
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

/// A sqlx 0.8 row as a [`Row`]: only the column types idem's statements return.
fn row_of(r: &PgRow) -> Result<Row, PgError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        if r.try_get_raw(i).map_err(error)?.is_null() {
            values.push(Value::Null);
            continue;
        }
        values.push(match col.type_info().name() {
            "BOOL" => Value::Bool(r.try_get(i).map_err(error)?),
            "INT2" => Value::Int(r.try_get::<i16, _>(i).map_err(error)?.into()),
            "INT4" => Value::Int(r.try_get::<i32, _>(i).map_err(error)?.into()),
            "INT8" => Value::Int(r.try_get(i).map_err(error)?),
            "TEXT" | "VARCHAR" | "NAME" => Value::Text(r.try_get(i).map_err(error)?),
            "BYTEA" => Value::Bytes(r.try_get(i).map_err(error)?),
            other => {
                return Err(PgError::new(format!(
                    "column {i} is of type {other}, which idem does not read"
                )));
            }
        });
    }
    Ok(Row::new(values))
}

fn error(e: sqlx08::Error) -> PgError {
    let code = match &e {
        sqlx08::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    let e = PgError::new(e);
    match code {
        Some(code) => e.with_code(code),
        None => e,
    }
}
