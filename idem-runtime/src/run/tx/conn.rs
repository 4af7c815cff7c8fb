//! The transaction parameter: what [`TxConnection`] gives the wrapper, and [`TxRef`], what the
//! stores take.

use std::any::Any;

/// A connection the transactional form can write the done mark on: a `sqlx::Transaction` (what
/// `pool.begin()` gives), or a database connection that is inside a transaction.
///
/// idem is built on sqlx **0.9**: its `Transaction<'_, Postgres | MySql | Sqlite>` and its
/// connections inside a transaction are implemented always. On PostgreSQL, transactions of other
/// libraries are too, behind features: sqlx 0.8's `Transaction<'_, Postgres>` and `PgConnection`
/// (`sqlx-0-8`), `tokio_postgres::Transaction` (`tokio-postgres`), or anything that implements
/// [`PgTransaction`](crate::PgTransaction), taken as `&mut dyn PgTransaction`.
///
/// ```
/// fn takes<C: idem_runtime::TxConnection + ?Sized>(_: &mut C) {}
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(pool: idem_runtime::sqlx::SqlitePool) -> Result<(), idem_runtime::sqlx::Error> {
/// let mut tx = pool.begin().await?;
/// takes(&mut tx);
/// # Ok(())
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a SQL transaction idem can write its done mark in",
    label = "the parameter named by `tx` must be `&mut` a transaction idem knows",
    note = "take the transaction as `tx: &mut sqlx::Transaction<'_, Postgres>` (or `MySql`, `Sqlite`), or `&mut PgConnection` inside a transaction",
    note = "idem is built on sqlx 0.9: if rustc names two versions of `sqlx_core`, your `sqlx::Transaction` is of another sqlx; for sqlx 0.8 on PostgreSQL enable idem-runtime's feature `sqlx-0-8`, for tokio-postgres its feature `tokio-postgres` (or implement `idem_runtime::PgTransaction` and take `&mut dyn PgTransaction`)"
)]
pub trait TxConnection: Send {
    /// The connection, type-erased, and whether it is inside a transaction.
    #[doc(hidden)]
    fn as_tx(&mut self) -> (TxRef<'_>, bool);
}

/// The caller's transaction as a store sees it: a connection of idem's own sqlx (0.9), to be
/// downcast to the store's connection type, or a PostgreSQL transaction of another library.
/// What [`TxConnection`] gives and [`TxStore`](crate::store::TxStore)'s methods take.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(pool: idem_runtime::sqlx::SqlitePool) -> Result<(), idem_runtime::sqlx::Error> {
/// use idem_runtime::TxRef;
/// let mut conn = pool.acquire().await?;
/// let tx = TxRef::Sqlx(&mut *conn);
/// assert_eq!(tx.library(), "sqlx 0.9");
/// # Ok(())
/// # }
/// ```
pub enum TxRef<'a> {
    /// A connection of idem's sqlx (`PgConnection`, `MySqlConnection`, `SqliteConnection`).
    Sqlx(&'a mut (dyn Any + Send)),
    /// A PostgreSQL transaction of another library.
    Pg(&'a mut (dyn crate::PgTransaction + 'a)),
}

impl TxRef<'_> {
    /// Which connection this is, to tell whether two calls run in one transaction (the address
    /// of the connection or transaction object; never dereferenced).
    pub(crate) fn identity(&self) -> usize {
        match self {
            TxRef::Sqlx(c) => std::ptr::from_ref::<dyn Any + Send>(&**c).cast::<()>() as usize,
            TxRef::Pg(t) => {
                std::ptr::from_ref::<dyn crate::PgTransaction>(&**t).cast::<()>() as usize
            }
        }
    }

    /// The same transaction, borrowed again for a shorter while (a `TxRef` is taken by value:
    /// this is how one is passed to several calls in turn).
    ///
    /// ```
    /// use idem_runtime::{Param, PgFuture, PgTransaction, Row, TxRef};
    /// # struct Fake;
    /// # impl PgTransaction for Fake {
    /// #     fn execute<'a>(&'a mut self, _: &'a str, _: &'a [Param<'a>]) -> PgFuture<'a, u64> { Box::pin(async { Ok(0) }) }
    /// #     fn query<'a>(&'a mut self, _: &'a str, _: &'a [Param<'a>]) -> PgFuture<'a, Vec<Row>> { Box::pin(async { Ok(vec![]) }) }
    /// #     fn library(&self) -> &'static str { "a fake driver" }
    /// # }
    /// fn name(tx: TxRef<'_>) -> &'static str {
    ///     tx.library()
    /// }
    /// let mut fake = Fake;
    /// let mut tx = TxRef::Pg(&mut fake);
    /// assert_eq!(name(tx.reborrow()), "a fake driver");
    /// assert_eq!(name(tx), "a fake driver"); // still usable after the reborrow
    /// ```
    pub fn reborrow(&mut self) -> TxRef<'_> {
        match self {
            TxRef::Sqlx(c) => TxRef::Sqlx(&mut **c),
            TxRef::Pg(t) => TxRef::Pg(&mut **t),
        }
    }

    /// The library the transaction is of, for error messages.
    pub fn library(&self) -> &'static str {
        match self {
            TxRef::Sqlx(_) => "sqlx 0.9",
            TxRef::Pg(t) => t.library(),
        }
    }
}

impl std::fmt::Debug for TxRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TxRef").field(&self.library()).finish()
    }
}

/// How the wrapper reaches the connection inside the transaction parameter. A function pointer
/// made by [`tx_access`], so that a parameter that is not a transaction is reported once, on it.
pub(crate) type AsTx<C> = fn(&mut C) -> (TxRef<'_>, bool);

/// The [`AsTx`] of the transaction parameter `_tx` (its type is all that is used).
#[doc(hidden)]
pub fn tx_access<C: TxConnection + ?Sized>(_tx: &C) -> AsTx<C> {
    C::as_tx
}
