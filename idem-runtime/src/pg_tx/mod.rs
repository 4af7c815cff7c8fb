//! The transactional form on a PostgreSQL transaction of another database library: what idem
//! needs of the caller's transaction to claim a key, write its done mark and take its savepoints
//! in it, so an app need not move to idem's own sqlx (0.9) to use `#[idempotent(tx = "tx")]`.
//!
//! [`PgTransaction`] is implemented, behind features of this crate, for
//! `tokio_postgres::Transaction` (feature `tokio-postgres`) and for sqlx **0.8**'s
//! `Transaction<'_, Postgres>` and `PgConnection` (feature `sqlx-0-8`). The store is a
//! [`SqlStore<Postgres>`](crate::SqlStore) (its own pool, on idem's sqlx, does the work outside
//! the caller's transaction: replays read after a commit, the watchdog); the claim, the mark and
//! the savepoints go through the caller's transaction.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

#[cfg(feature = "sqlx-0-8")]
mod sqlx08;
#[cfg(feature = "tokio-postgres")]
mod tokio_pg;

/// The future a [`PgTransaction`] method returns: boxed, so that the trait is object-safe.
pub type PgFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PgError>> + Send + 'a>>;

/// A PostgreSQL transaction idem can run its own statements in: the claim of a key (an advisory
/// lock and the key's row), the done mark, and its savepoints. Object-safe; idem passes it
/// around as `&mut dyn PgTransaction`.
///
/// Statements use PostgreSQL's placeholders (`$1`, `$2`, ...), one [`Param`] each. idem's own
/// statements read only `bool`, `smallint`, `integer`, `bigint`, `text` and `bytea` columns.
///
/// Implemented for `tokio_postgres::Transaction<'_>` (feature `tokio-postgres`) and sqlx 0.8's
/// `Transaction<'_, Postgres>` and `PgConnection` (feature `sqlx-0-8`). Another library can be
/// reached by implementing it (and taking the parameter as `tx: &mut dyn PgTransaction`):
///
/// ```
/// use idem_runtime::{Param, PgError, PgFuture, PgTransaction, Row, Value};
///
/// /// A stand-in for a driver: answers every statement with one row.
/// struct Fake;
///
/// impl PgTransaction for Fake {
///     fn execute<'a>(&'a mut self, _sql: &'a str, _params: &'a [Param<'a>]) -> PgFuture<'a, u64> {
///         Box::pin(async { Ok(1) })
///     }
///     fn query<'a>(&'a mut self, _sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>> {
///         let first = match params.first() {
///             Some(Param::I64(Some(v))) => Value::Int(*v),
///             _ => Value::Null,
///         };
///         Box::pin(async move { Ok(vec![Row::new(vec![first])]) })
///     }
///     fn library(&self) -> &'static str {
///         "a fake driver"
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let tx: &mut dyn PgTransaction = &mut Fake;
/// let rows = tx.query("SELECT $1::bigint", &[Param::I64(Some(7))]).await.unwrap();
/// assert_eq!(rows[0].get(0), Some(&Value::Int(7)));
/// assert_eq!(tx.execute("SAVEPOINT s", &[]).await.unwrap(), 1);
/// # });
/// ```
pub trait PgTransaction: Send {
    /// Run one statement; how many rows it wrote (what the server reports; 0 for statements
    /// that report none, such as `SAVEPOINT`). idem runs its parameterless statements (its
    /// savepoints, `ROLLBACK`, `BEGIN`) through it too and reads no count from them, so an
    /// implementation may send those by the simple query protocol and answer 0.
    fn execute<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, u64>;

    /// Run one statement and return its rows.
    fn query<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>>;

    /// Whether the connection is inside a transaction, where the library can tell (`None`: it
    /// cannot). A connection known to be in none is refused before any statement is run.
    fn in_transaction(&self) -> Option<bool> {
        None
    }

    /// The library and its version, for error messages (e.g. `"tokio-postgres 0.7"`).
    fn library(&self) -> &'static str;
}

/// One parameter of a statement. Each kind is nullable (`None` is SQL `NULL` of that type), so
/// that a driver that types its parameters can bind a `NULL` too.
///
/// ```
/// use idem_runtime::Param;
/// let params = [Param::Text(Some("scope")), Param::Bytes(None), Param::I64(Some(5)), Param::Bool(Some(true))];
/// assert!(params[1].is_null());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param<'a> {
    /// `text`.
    Text(Option<&'a str>),
    /// `bytea`.
    Bytes(Option<&'a [u8]>),
    /// `bigint`.
    I64(Option<i64>),
    /// `boolean`.
    Bool(Option<bool>),
}

impl Param<'_> {
    /// Whether this is SQL `NULL`.
    pub fn is_null(&self) -> bool {
        match self {
            Param::Text(v) => v.is_none(),
            Param::Bytes(v) => v.is_none(),
            Param::I64(v) => v.is_none(),
            Param::Bool(v) => v.is_none(),
        }
    }
}

/// One column's value in a [`Row`]: integers of any width are [`Value::Int`].
///
/// ```
/// use idem_runtime::Value;
/// assert_ne!(Value::Int(1), Value::Null);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `smallint`, `integer` or `bigint`.
    Int(i64),
    /// `text` (or `varchar`, `name`).
    Text(String),
    /// `bytea`.
    Bytes(Vec<u8>),
}

/// A row a statement returned, its columns in order.
///
/// ```
/// use idem_runtime::{Row, Value};
/// let row = Row::new(vec![Value::Bool(true), Value::Null]);
/// assert_eq!(row.len(), 2);
/// assert_eq!(row.get(1), Some(&Value::Null));
/// assert_eq!(row.get(2), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row(Vec<Value>);

impl Row {
    /// A row of these values, in column order.
    pub fn new(values: Vec<Value>) -> Row {
        Row(values)
    }

    /// The value of column `i` (from 0), or `None` past the last column.
    pub fn get(&self, i: usize) -> Option<&Value> {
        self.0.get(i)
    }

    /// How many columns the row has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Column `i`, taken out (so bytes are not copied), or what is wrong with it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn take(&mut self, i: usize) -> Result<Value, String> {
        match self.0.get_mut(i) {
            Some(v) => Ok(std::mem::replace(v, Value::Null)),
            None => Err(format!("no column {i} in a row of {}", self.0.len())),
        }
    }
}

/// What a [`PgTransaction`] statement failed with: the driver's error, and the server's
/// SQLSTATE code when the server answered (idem tells a missing table, `42P01`, and a
/// transaction that is gone, `25P01`/`25P02`, from the rest).
///
/// ```
/// use idem_runtime::PgError;
/// let e = PgError::new("connection closed").with_code("08006");
/// assert_eq!(e.code(), Some("08006"));
/// assert_eq!(e.to_string(), "connection closed (SQLSTATE 08006)");
/// ```
pub struct PgError {
    code: Option<String>,
    source: crate::BoxError,
}

impl PgError {
    /// The driver's error, without a SQLSTATE code.
    pub fn new(source: impl Into<crate::BoxError>) -> PgError {
        PgError {
            code: None,
            source: source.into(),
        }
    }

    /// With the server's SQLSTATE code.
    pub fn with_code(mut self, code: impl Into<String>) -> PgError {
        self.code = Some(code.into());
        self
    }

    /// The server's SQLSTATE code, if the server answered.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

impl fmt::Debug for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgError")
            .field("code", &self.code)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)?;
        match &self.code {
            Some(code) => write!(f, " (SQLSTATE {code})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A `&mut dyn PgTransaction` (of a library idem has no feature for) as the transaction
/// parameter.
impl crate::TxConnection for dyn PgTransaction + '_ {
    fn as_tx(&mut self) -> (crate::TxRef<'_>, bool) {
        let in_tx = self.in_transaction() != Some(false);
        (crate::TxRef::Pg(self), in_tx)
    }
}
