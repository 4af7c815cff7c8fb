//! [`PgTransaction`] for tokio-postgres 0.7 (feature `tokio-postgres`).

use futures_util::TryStreamExt as _;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::{Param, PgError, PgFuture, PgTransaction, Row, Value};

/// A `tokio_postgres::Transaction` (what `client.transaction()` gives) runs idem's statements.
/// A bare `Client` is not one: tokio-postgres cannot tell whether it is inside a transaction.
///
/// ```no_run
/// # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
/// use idem_runtime::{Param, PgTransaction};
/// let mut tx = client.transaction().await?;
/// let rows = PgTransaction::query(&mut tx, "SELECT $1::bigint", &[Param::I64(Some(1))]).await;
/// assert_eq!(rows.unwrap().len(), 1);
/// tx.commit().await
/// # }
/// ```
impl PgTransaction for tokio_postgres::Transaction<'_> {
    fn execute<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, u64> {
        Box::pin(async move {
            if params.is_empty() {
                // idem's parameterless statements (savepoints): the simple protocol, one
                // round trip, and no count to read.
                return self.batch_execute(sql).await.map(|()| 0).map_err(error);
            }
            // Typed by idem: one round trip (no prepare), the count read off the stream's end.
            let stream = self
                .query_typed_raw(sql, typed(params))
                .await
                .map_err(error)?;
            let mut stream = std::pin::pin!(stream);
            while stream.try_next().await.map_err(error)?.is_some() {}
            Ok(stream.rows_affected().unwrap_or(0))
        })
    }

    fn query<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>> {
        Box::pin(async move {
            // Typed by idem: one round trip, where an untyped query prepares first.
            let bound = bind(params);
            let typed: Vec<(&(dyn ToSql + Sync), Type)> = bound
                .iter()
                .map(|p| (p as &(dyn ToSql + Sync), p.ty()))
                .collect();
            let rows = self.query_typed(sql, &typed).await.map_err(error)?;
            rows.iter().map(row_of).collect()
        })
    }

    fn library(&self) -> &'static str {
        "tokio-postgres 0.7"
    }
}

/// A `&mut tokio_postgres::Transaction` as the transaction parameter of
/// `#[idempotent(tx = "tx")]`.
impl crate::TxConnection for tokio_postgres::Transaction<'_> {
    fn as_tx(&mut self) -> (crate::TxRef<'_>, bool) {
        (crate::TxRef::Pg(self), true)
    }
}

/// A [`Param`] as tokio-postgres binds it: the value's own `ToSql`, so its type is checked
/// against the statement's.
#[derive(Debug)]
struct Bound<'a>(Param<'a>);

fn bind<'a>(params: &'a [Param<'a>]) -> Vec<Bound<'a>> {
    params.iter().map(|p| Bound(*p)).collect()
}

/// The parameters with their types, as `query_typed_raw` takes them.
fn typed<'a>(params: &'a [Param<'a>]) -> impl Iterator<Item = (Bound<'a>, Type)> + 'a {
    params.iter().map(|p| {
        let bound = Bound(*p);
        let ty = bound.ty();
        (bound, ty)
    })
}

impl Bound<'_> {
    /// The PostgreSQL type of the parameter's kind: `text`, `bytea`, `bigint`, `boolean`.
    fn ty(&self) -> Type {
        match self.0 {
            Param::Text(_) => Type::TEXT,
            Param::Bytes(_) => Type::BYTEA,
            Param::I64(_) => Type::INT8,
            Param::Bool(_) => Type::BOOL,
        }
    }
}

impl ToSql for Bound<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Param::Text(v) => v.to_sql(ty, out),
            Param::Bytes(v) => v.to_sql(ty, out),
            Param::I64(v) => v.to_sql(ty, out),
            Param::Bool(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // Any type one of the kinds takes; `to_sql_checked` checks the value's own kind.
        <Option<&str> as ToSql>::accepts(ty)
            || <Option<&[u8]> as ToSql>::accepts(ty)
            || <Option<i64> as ToSql>::accepts(ty)
            || <Option<bool> as ToSql>::accepts(ty)
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Param::Text(v) => v.to_sql_checked(ty, out),
            Param::Bytes(v) => v.to_sql_checked(ty, out),
            Param::I64(v) => v.to_sql_checked(ty, out),
            Param::Bool(v) => v.to_sql_checked(ty, out),
        }
    }
}

/// A tokio-postgres row as a [`Row`]: only the column types idem's statements return.
fn row_of(r: &tokio_postgres::Row) -> Result<Row, PgError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let ty = col.type_();
        let value = if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i).map(|v| v.map(Value::Bool))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR || *ty == Type::NAME {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map(Value::Text))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)
                .map(|v| v.map(Value::Bytes))
        } else {
            return Err(PgError::new(format!(
                "column {i} is of type {ty}, which idem does not read"
            )));
        };
        values.push(value.map_err(error)?.unwrap_or(Value::Null));
    }
    Ok(Row::new(values))
}

fn error(e: tokio_postgres::Error) -> PgError {
    // tokio-postgres's own `Display` of a server error is only "db error": say what the server
    // said (its severity, message and SQLSTATE are in its `DbError`).
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code().to_owned();
            let text = format!("{}: {}", db.severity(), db.message());
            PgError::new(text).with_code(code)
        }
        None => PgError::new(e),
    }
}
