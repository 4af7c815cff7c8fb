//! The caller's transaction as the SQL store runs its statements on it, and the transactions of
//! idem's sqlx taken as the transaction parameter.

use sqlx::Transaction;

use super::super::{Backend, db_error};
use crate::run::TxConnection;
use crate::{PgTransaction, StoreError, TxRef};

/// The caller's transaction as the store runs its statements on it: a connection of idem's sqlx
/// of the store's database, or a PostgreSQL transaction of another library.
pub(super) enum Conn<'a, DB: Backend> {
    Native(&'a mut DB::Connection),
    Foreign(&'a mut (dyn PgTransaction + 'a)),
}

/// The transaction's connection, or why the store cannot use it.
pub(super) fn conn_of<DB: Backend>(tx: TxRef<'_>) -> Result<Conn<'_, DB>, StoreError> {
    match tx {
        TxRef::Sqlx(c) => c
            .downcast_mut::<DB::Connection>()
            .map(Conn::Native)
            .ok_or_else(|| {
                StoreError::Unsupported(format!(
                    "the transaction is not on {}, the store's database",
                    DB::NAME
                ))
            }),
        TxRef::Pg(t) if DB::NAME == "PostgreSQL" => Ok(Conn::Foreign(t)),
        TxRef::Pg(t) => Err(super::super::sealed::not_postgres::<DB>(t.library())),
    }
}

impl<DB: Backend> Conn<'_, DB> {
    /// Run one statement of ours that takes no parameters (savepoints, `ROLLBACK`, `BEGIN`).
    /// `gone`: a database error saying the transaction is not open is
    /// [`StoreError::TransactionGone`].
    pub(super) async fn raw(&mut self, sql: String, gone: bool) -> Result<(), StoreError> {
        match self {
            Conn::Native(c) => DB::raw(c, sql).await.map_err(|e| {
                if gone {
                    gone_or_db_error(e)
                } else {
                    db_error(e)
                }
            }),
            Conn::Foreign(t) => match t.execute(&sql, &[]).await {
                Ok(_) => Ok(()),
                Err(e) if gone && matches!(e.code(), Some("25P01" | "25P02")) => {
                    Err(StoreError::TransactionGone(e.to_string()))
                }
                Err(e) => Err(StoreError::Unavailable(Box::new(e))),
            },
        }
    }
}

/// A database error that says the transaction is not open any more (PostgreSQL: 25P01, no
/// transaction; 25P02, a failed one) is [`StoreError::TransactionGone`].
fn gone_or_db_error(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(d) = &e
        && matches!(d.code().as_deref(), Some("25P01" | "25P02"))
    {
        return StoreError::TransactionGone(d.message().to_owned());
    }
    db_error(e)
}

/// A sqlx transaction (what `pool.begin()` gives), of any database the SQL store runs on.
impl<DB: Backend> TxConnection for Transaction<'_, DB> {
    fn as_tx(&mut self) -> (TxRef<'_>, bool) {
        (TxRef::Sqlx(&mut **self), true)
    }
}

/// A bare connection: inside a transaction (`BEGIN` sent by hand), or refused.
macro_rules! connection_is_tx {
    ($($feature:literal => $conn:ty),*) => {$(
        #[cfg(feature = $feature)]
        impl TxConnection for $conn {
            fn as_tx(&mut self) -> (TxRef<'_>, bool) {
                let in_tx = sqlx::Connection::is_in_transaction(self);
                (TxRef::Sqlx(self), in_tx)
            }
        }
    )*};
}
connection_is_tx!(
    "postgres" => sqlx::PgConnection,
    "mysql" => sqlx::MySqlConnection,
    "sqlite" => sqlx::SqliteConnection
);
