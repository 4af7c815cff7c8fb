//! The transactional mode, with a SQL store as the durable layer.

use super::LayeredStore;
use crate::store::{Lease, Store};

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
)]
impl<F: Store, DB: crate::sql::Backend> LayeredStore<F, crate::SqlStore<DB>> {
    /// [`SqlStore::run_in_tx`](crate::SqlStore::run_in_tx) behind the front: **exactly once in
    /// effect** for the writes `handler` makes in the transaction it is given, with duplicates
    /// answered by the front.
    ///
    /// The key is claimed like [`begin`](Store::begin) does (front, then the database with the
    /// same token; a duplicate of a done key is replayed by the front alone). Then a transaction
    /// begins on the SQL store's pool and `handler` runs in it; on `Ok(v)` the done mark (with `v`)
    /// is written **in that transaction**, token-checked, and the transaction commits: the effect
    /// and the mark commit together or not at all. After the commit the front gets the done mark
    /// (best effort: if it fails, the next duplicate finds the database's record and backfills
    /// it). On `Err`, a panic or cancellation the transaction rolls back and the key is released
    /// in both layers. The outcomes mean what they mean for `SqlStore::run_in_tx`.
    ///
    /// ```no_run
    /// # #[cfg(all(feature = "redis", feature = "postgres"))]
    /// # async fn demo(store: idem_runtime::LayeredStore<idem_runtime::RedisStore, idem_runtime::PgStore>) {
    /// use idem_runtime::{Call, Options, sqlx};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error(transparent)]
    ///     Idem(#[from] idem_runtime::Error),
    ///     #[error(transparent)]
    ///     Db(#[from] sqlx::Error),
    /// }
    ///
    /// let opts = Options::new("coupons::issue");
    /// let code: Result<String, AppError> = store
    ///     .run_in_tx(&opts, Call::new("order-7"), |tx| Box::pin(async move {
    ///         sqlx::query("INSERT INTO coupons (order_id, code) VALUES ('order-7', 'C-1')")
    ///             .execute(&mut **tx)
    ///             .await?;
    ///         Ok("C-1".to_string())
    ///     }))
    ///     .await;
    /// # let _ = code;
    /// # }
    /// ```
    pub async fn run_in_tx<R, H>(&self, opts: &crate::Options, call: crate::Call, handler: H) -> R
    where
        R: crate::Outcome,
        R::Ok: crate::Replayable,
        R::Err: crate::AbsorbsIdemError,
        H: for<'t> FnOnce(&'t mut sqlx::Transaction<'static, DB>) -> crate::sql::TxFuture<'t, R>,
    {
        use crate::Error;
        use crate::sql::fail;

        let key = call.key().ok().cloned();
        let body = move |lease: Lease| async move {
            let scope = opts.scope_str();
            let Some(key) = key else {
                // `execute` refuses an invalid key before it calls the handler.
                return fail(Error::InvalidKey {
                    reason: "the key is empty",
                });
            };
            let (value, output) = match self
                .durable()
                .transact(None, opts, &key, &lease, handler)
                .await
            {
                Ok(done) => done,
                Err(failed) => return failed,
            };
            let tracked = self.inner.leases.take(lease.token);
            self.inner
                .front_mark(scope, &key, &lease, &output, opts.keep, tracked)
                .await;
            R::from_result(Ok(value))
        };
        crate::run::execute(self, opts, call, crate::run::Marking::ByHandler, body).await
    }
}
