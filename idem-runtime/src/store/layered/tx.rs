//! The transactional form through the layered store: the front claims first and answers
//! duplicates; the durable store claims, marks and releases in the caller's transaction.

use std::sync::Arc;
use std::time::Duration;

use super::{LayeredStore, SETTLE};
use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{Key, StoreError, TxRef};

impl<F: Store, D: Store> LayeredStore<F, D> {
    fn durable_tx(&self) -> Result<&dyn TxStore, StoreError> {
        self.inner
            .durable
            .transactional()
            .ok_or_else(|| StoreError::Unsupported("the durable store keeps no SQL table".into()))
    }
}

#[async_trait::async_trait]
impl<F: Store, D: Store> TxStore for LayeredStore<F, D> {
    async fn begin_in(&self, tx: TxRef<'_>, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let durable = self.durable_tx()?;
        // Where the durable claim is made outside the transaction (MySQL/MariaDB), what it reads
        // is committed.
        let in_tx = durable.claims_in_tx();
        self.inner
            .begin_via(req, in_tx, move || durable.begin_in(tx, req))
            .await
    }

    async fn complete_in(
        &self,
        tx: TxRef<'_>,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) -> Result<(), StoreError> {
        // The front learns of it only once the caller has committed (see `marked_in`).
        self.durable_tx()?
            .complete_in(tx, scope, key, lease, output, keep)
            .await
    }

    async fn release_in(
        &self,
        tx: TxRef<'_>,
        scope: &str,
        key: &Key,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        let answer = self.durable_tx()?.release_in(tx, scope, key, lease).await;
        self.inner.front_release(scope, key, lease).await;
        answer
    }

    async fn savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        self.durable_tx()?.savepoint_in(tx, name).await
    }

    async fn rollback_to_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        self.durable_tx()?.rollback_to_savepoint_in(tx, name).await
    }

    async fn release_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        self.durable_tx()?.release_savepoint_in(tx, name).await
    }

    async fn abort_in(&self, tx: TxRef<'_>) -> Result<(), StoreError> {
        self.durable_tx()?.abort_in(tx).await
    }

    async fn committed_done(
        &self,
        scope: &str,
        key: &Key,
    ) -> Result<Option<(Vec<u8>, Option<crate::Fingerprint>)>, StoreError> {
        self.durable_tx()?.committed_done(scope, key).await
    }

    fn claims_in_tx(&self) -> bool {
        self.durable_tx().is_ok_and(|d| d.claims_in_tx())
    }

    fn waits_in_tx(&self) -> bool {
        self.durable_tx().is_ok_and(|d| d.waits_in_tx())
    }

    fn renewer_in_tx(&self) -> Option<Arc<dyn Store>> {
        match self.durable_tx().ok()?.renewer_in_tx() {
            // The durable claim is a lease of its own (MySQL/MariaDB): renew both layers.
            Some(_) => Some(self.for_watchdog()),
            // The transaction holds the durable claim: only the front's needs renewing, and the
            // front losing it (a flush, a restart) loses nothing.
            None => Some(Arc::new(FrontOfTx(self.twin().clone()))),
        }
    }

    /// The caller has yet to commit: the front cannot say "done" before that, so its claim is
    /// kept for one more second; duplicates then reach the database, which answers (and
    /// backfills the front).
    async fn marked_in(&self, scope: &str, key: &Key, lease: &Lease) {
        let inner = &*self.inner;
        let _ = inner
            .front_op("extend", || inner.front.extend(scope, key, lease, SETTLE))
            .await;
    }
}

/// What renews a transactional call's claim when the caller's transaction holds the durable
/// one (PostgreSQL, SQLite): the front's claim only, claimed again when the front lost it (so
/// duplicates are refused there instead of each reaching the database), and never reported
/// lost: the transaction still holds the key, so the handler's work is safe.
struct FrontOfTx(super::Twin);

#[async_trait::async_trait]
impl Store for FrontOfTx {
    async fn begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        self.0.front().begin(req).await
    }

    async fn complete(
        &self,
        _scope: &str,
        _key: &Key,
        _lease: &Lease,
        _output: &[u8],
        _keep: Duration,
    ) -> Result<(), StoreError> {
        // The mark is the transaction's; the front learns it after the commit.
        Ok(())
    }

    async fn release(&self, scope: &str, key: &Key, lease: &Lease) -> Result<(), StoreError> {
        self.0.inner.front_release(scope, key, lease).await;
        Ok(())
    }

    async fn extend(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let inner = &*self.0.inner;
        let renewed = inner
            .front_op("extend", || inner.front.extend(scope, key, lease, ttl))
            .await;
        if let Ok(Err(StoreError::LeaseLost)) = renewed {
            // Briefly: if the call released the key meanwhile, this claim belongs to no one;
            // the next renewal (while the call still runs) makes it whole again.
            let again = BeginRequest {
                scope,
                key,
                token: lease.token,
                ttl: ttl.min(Duration::from_secs(1)),
                fingerprint: lease.fingerprint,
            };
            let _ = inner.front_op("extend", || inner.front.begin(&again)).await;
        }
        Ok(())
    }

    fn for_watchdog(&self) -> Arc<dyn Store> {
        Arc::new(FrontOfTx(self.0.clone()))
    }
}

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
    /// The key is claimed like [`begin`](Store::begin) does (the front, then the database in the
    /// transaction, with the same token; a duplicate of a done key is replayed by the front
    /// alone). On `Ok(v)` the done mark (with `v`) is written **in that transaction**, the
    /// transaction commits, and then the front gets the done mark (best effort: if it fails, the
    /// next duplicate finds the database's record and backfills it). On `Err`, a panic or
    /// cancellation the transaction rolls back and the key is released in both layers. The
    /// outcomes mean what they mean for `SqlStore::run_in_tx`.
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
        let pool = self.durable().pool();
        let (out, marked) =
            crate::store::sql::run_owned(self, self, None, pool, opts, call, handler).await;
        if let Some(m) = marked {
            // Committed: now the front may answer duplicates with it.
            self.inner
                .front_mark(&m.scope, &m.key, &m.lease, &m.output, m.keep)
                .await;
        }
        out
    }
}
