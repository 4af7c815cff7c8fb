//! The transactional form on the SQL store: the claim, the done mark and the release in the
//! caller's transaction (see `run/tx.rs` for the steps), and `run_in_tx` / `run_with_tx`, which
//! begin and commit the transaction themselves.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Transaction;

use super::sealed::Mark;
use super::sealed::{At, Claim};
use super::{Backend, DONE, SqlStore, micros, stored_scope};
use crate::observe::CallOutcome;
use crate::run::{
    Marked, NESTED, Owned, TxConnection, claim_outside, execute_tx, lift, release, release_later,
    replay_committed,
};
use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{
    AbsorbsIdemError, Call, Error, Fingerprint, Key, Options, Outcome, Phase, Replayable,
    StoreError, TxRef,
};
use tracing::Instrument;

mod conn;
use conn::{Conn, conn_of};

/// The future a handler given to [`SqlStore::run_in_tx`] returns: boxed, because it borrows the
/// transaction it was given.
pub type TxFuture<'t, R> = Pin<Box<dyn Future<Output = R> + Send + 't>>;

#[async_trait::async_trait]
impl<DB: Backend> TxStore for SqlStore<DB> {
    async fn begin_in(&self, tx: TxRef<'_>, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let conn = conn_of::<DB>(tx)?;
        if !DB::CLAIMS_IN_TX {
            // A lease outside the transaction, through a pool of its own: the caller's
            // transaction holds a connection of the application's pool, which may be its last.
            return self.outside()?.begin(req).await;
        }
        let scope = stored_scope(req.scope);
        let holder = crate::store::ops::this_holder();
        let claim = Claim {
            at: At {
                scope: &scope,
                key: req.key.as_str(),
            },
            token: req.token,
            ttl_us: micros(req.ttl),
            fingerprint: req.fingerprint.map(|f| f.0),
            brief_lock_wait: false,
            holder: &holder,
        };
        let (sql, table) = (&self.inner.sql, &self.inner.table);
        match conn {
            Conn::Native(c) => DB::begin_in(c, sql, table, &claim).await,
            Conn::Foreign(t) => DB::begin_in_foreign(t, sql, table, &claim).await,
        }
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
        let scope = stored_scope(scope);
        let mark = Mark {
            at: At {
                scope: &scope,
                key: key.as_str(),
            },
            token: lease.token,
            fingerprint: lease.fingerprint.map(|f| f.0),
            output,
            keep_us: micros(keep),
            in_tx: DB::CLAIMS_IN_TX,
        };
        match conn_of::<DB>(tx)? {
            Conn::Native(c) => DB::complete(c, &self.inner.sql, &mark).await,
            Conn::Foreign(t) => DB::complete_foreign(t, &self.inner.sql, &mark).await,
        }
    }

    async fn release_in(
        &self,
        tx: TxRef<'_>,
        scope: &str,
        key: &Key,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        conn_of::<DB>(tx)?;
        if DB::CLAIMS_IN_TX {
            // The claim was made after the savepoint, and undone with it.
            Ok(())
        } else {
            self.outside()?.release(scope, key, lease).await
        }
    }

    async fn savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        let mut conn = conn_of::<DB>(tx)?;
        if let Conn::Foreign(t) = &conn
            && t.in_transaction() == Some(false)
        {
            return Err(StoreError::TransactionGone(format!(
                "the {} connection reports no transaction",
                t.library()
            )));
        }
        conn.raw(format!("SAVEPOINT {}", savepoint(name)?), true)
            .await?;
        // MySQL and MariaDB accept a savepoint outside a transaction (a deadlock rolled the
        // caller's back, and sqlx does not know): the handler's writes would then commit one by
        // one. Where the server can tell, it is asked.
        if let Conn::Native(c) = &mut conn
            && let Some(false) = DB::in_transaction(c).await?
        {
            return Err(StoreError::TransactionGone(
                "the server reports the connection in no transaction (rolled back: a deadlock, or an earlier TransactionAborted)".into(),
            ));
        }
        Ok(())
    }

    async fn rollback_to_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        let mut conn = conn_of::<DB>(tx)?;
        let name = savepoint(name)?;
        conn.raw(format!("ROLLBACK TO SAVEPOINT {name}"), false)
            .await?;
        conn.raw(format!("RELEASE SAVEPOINT {name}"), false).await
    }

    async fn release_savepoint_in(&self, tx: TxRef<'_>, name: &str) -> Result<(), StoreError> {
        conn_of::<DB>(tx)?
            .raw(format!("RELEASE SAVEPOINT {}", savepoint(name)?), false)
            .await
    }

    /// Roll back, then begin again at once, so that nothing written through this connection
    /// afterwards commits by itself (the driver still counts the transaction as open, and the
    /// caller was told to roll it back). On PostgreSQL the new transaction is also made to fail,
    /// so that every later statement on it fails and a commit rolls back.
    async fn abort_in(&self, tx: TxRef<'_>) -> Result<(), StoreError> {
        let mut conn = conn_of::<DB>(tx)?;
        // Fails when the server has no transaction any more (SQLite says so): no matter.
        let _ = conn.raw("ROLLBACK".to_owned(), false).await;
        conn.raw("BEGIN".to_owned(), false).await?;
        if DB::NAME == "PostgreSQL" {
            let _ = conn
                .raw(
                    "DO $$ BEGIN RAISE EXCEPTION 'idem: this transaction was rolled back (TransactionAborted): roll it back'; END $$".to_owned(),
                    false,
                )
                .await;
        }
        Ok(())
    }

    async fn committed_done(
        &self,
        scope: &str,
        key: &Key,
    ) -> Result<Option<(Vec<u8>, Option<Fingerprint>)>, StoreError> {
        let Some(side) = self.side() else {
            return Ok(None);
        };
        let scope = stored_scope(scope);
        let at = At {
            scope: &scope,
            key: key.as_str(),
        };
        let mut conn = side.acquire().await?;
        let Some(row) = DB::peek(&mut conn, &side.inner.sql, &at).await? else {
            return Ok(None);
        };
        if row.state != DONE || row.remaining_us <= 0 {
            return Ok(None);
        }
        let fingerprint = match row.fingerprint {
            None => None,
            Some(f) => Some(Fingerprint(f.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("fingerprint of {} bytes", f.len()))
            })?)),
        };
        match row.output {
            Some(output) => Ok(Some((output, fingerprint))),
            None => Err(StoreError::Corrupt("done record without output".into())),
        }
    }

    fn claims_in_tx(&self) -> bool {
        DB::CLAIMS_IN_TX
    }

    fn waits_in_tx(&self) -> bool {
        !DB::CLAIM_LOCKS_DATABASE
    }

    fn replays_committed_first(&self) -> bool {
        DB::CLAIMS_IN_TX && DB::CLAIM_LOCKS_DATABASE
    }

    fn renewer_in_tx(&self) -> Option<Arc<dyn Store>> {
        (!DB::CLAIMS_IN_TX).then(|| self.for_watchdog())
    }
}

impl<DB: Backend> SqlStore<DB> {
    /// The store for claims made outside the caller's transaction (MySQL/MariaDB).
    fn outside(&self) -> Result<&SqlStore<DB>, StoreError> {
        self.side().ok_or_else(|| {
            StoreError::Unsupported(format!(
                "no second pool can reach this {} database",
                DB::NAME
            ))
        })
    }
}

/// A savepoint name is spliced into SQL: only the wrapper's own (`[a-z0-9_]`) are accepted.
fn savepoint(name: &str) -> Result<&str, StoreError> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name)
    } else {
        Err(StoreError::Unsupported(format!(
            "invalid savepoint name {name:?}"
        )))
    }
}

/// Begin, run and commit a transaction of the wrapper's own: what `run_in_tx` does for the SQL
/// store and for a layered store over one. Returns what the done mark held when it was written
/// and committed.
pub(crate) async fn run_owned<DB, R, F>(
    store: &dyn Store,
    txs: &dyn TxStore,
    tx: Option<Transaction<'static, DB>>,
    pool: &sqlx::Pool<DB>,
    opts: &Options,
    call: Call,
    handler: F,
) -> (R, Option<Marked>)
where
    DB: Backend,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
{
    // One span for the whole call, its claim and its commit included.
    async move {
    // A claim made outside the transaction comes first, so that a duplicate that is refused or
    // waits holds no connection for a transaction it will not use. Not when the caller began
    // the transaction: it holds a connection of the pool already, and the claim goes through
    // the store's own (in `execute_tx`).
    let mut peeked = false;
    let claimed = if txs.claims_in_tx() || tx.is_some() {
        // Where the claim would take the database's write lock (SQLite), a duplicate of a key
        // done and committed is answered before a transaction is begun at all.
        if tx.is_none() && txs.replays_committed_first() {
            peeked = true;
            if let Some(answer) = replay_committed::<R>(txs, opts, &call).await {
                return (answer, None);
            }
        }
        None
    } else {
        match claim_outside::<R>(store, opts, &call).await {
            Ok(claimed) => claimed,
            Err(answer) => return (answer, None),
        }
    };
    // Until `execute_tx` takes the claim over (with its renewals and its guard), a drop of this
    // call (cancelled while it waits for its transaction) gives it back.
    let unrun = claimed.as_ref().map(|(key, granted)| Unrun {
        store,
        scope: opts.scope_str(),
        key: key.clone(),
        lease: granted.lease,
        ttl: opts.ttl_duration(),
        armed: true,
    });
    let tx = match tx {
        Some(tx) => Ok(tx),
        // Deferred on SQLite too: the claim is the transaction's first statement, and a write.
        None => pool.begin().await,
    };
    let mut tx = match tx {
        Ok(tx) => tx,
        Err(e) => {
            // `unrun` gives the claim back (retrying, as the store may be down).
            drop(unrun);
            let e = Error::Unavailable {
                phase: Phase::Begin,
                source: Box::new(e),
            };
            return (lift(opts, e), None);
        }
    };
    if let Some(mut unrun) = unrun {
        unrun.armed = false;
    }
    let mut owned = Owned {
        peeked,
        ..Owned::default()
    };
    let run = execute_tx(
        store,
        txs,
        opts,
        call,
        claimed.map(|(_, granted)| granted),
        &mut tx,
        <Transaction<'static, DB> as TxConnection>::as_tx,
        move |tx| async move { (handler(&mut *tx).await, tx) },
        Some(&mut owned),
    );
    let (out, nested) = NESTED
        .scope(RefCell::new(Vec::new()), async {
            let out = run.await;
            (out, NESTED.with(|n| n.take()))
        })
        .await;
    // The first runs nested in this one are counted with its commit.
    let settle_nested = |committed: bool| {
        for opts in &nested {
            let outcome = if committed {
                CallOutcome::Executed
            } else {
                CallOutcome::CommitFailed
            };
            crate::metrics::count(opts, outcome);
        }
    };
    let Some(done) = owned.marked else {
        if owned.commit {
            // Shadow mode, and the handler returned `Ok`: its writes commit, as without idem.
            let committed = tx.commit().await;
            settle_nested(committed.is_ok());
            return match committed {
                Ok(()) => (out, None),
                Err(e) => {
                    let e = Error::Unavailable {
                        phase: Phase::Complete,
                        source: Box::new(e),
                    };
                    (R::from_result(Err(e.into())), None)
                }
            };
        }
        // Replayed, refused, failed: nothing of ours to keep.
        if let Err(e) = tx.rollback().await {
            tracing::debug!(error = %e, "rollback failed; the database rolls back on its side");
        }
        settle_nested(false);
        return (out, None);
    };
    let fence = Some(done.lease.fence);
    let committed = tx.commit().await;
    settle_nested(committed.is_ok());
    match committed {
        Ok(()) => {
            crate::metrics::record(opts, CallOutcome::Executed, Some(&done.key), fence);
            (out, Some(done))
        }
        Err(e) => {
            // Rolled back, unless the reply was lost after a commit: then the key is done, and
            // releasing it changes nothing. Either way a redelivery finds the truth.
            let twin = store.for_watchdog();
            let ttl = opts.ttl_duration();
            release(store, Some(&twin), &done.scope, &done.key, &done.lease, ttl).await;
            tracing::error!(scope = %done.scope, key = %done.key, error = %e, "the commit of the handler's transaction failed: its writes and its mark are rolled back");
            crate::metrics::record(opts, CallOutcome::CommitFailed, Some(&done.key), fence);
            let e = Error::Unavailable {
                phase: Phase::Complete,
                source: Box::new(e),
            };
            (R::from_result(Err(e.into())), None)
        }
    }
    }
    .instrument(crate::run::call_span(opts))
    .await
}

/// A claim made outside the transaction that no handler has run on yet: given back (from the
/// watchdog's thread, retrying while the store does not answer) if dropped armed.
struct Unrun<'a> {
    store: &'a dyn Store,
    scope: &'a str,
    key: Key,
    lease: Lease,
    ttl: Duration,
    armed: bool,
}

impl Drop for Unrun<'_> {
    fn drop(&mut self) {
        if self.armed {
            release_later(
                self.store.for_watchdog(),
                self.scope.to_owned(),
                self.key.clone(),
                self.lease,
                self.ttl,
            );
        }
    }
}

impl<DB: Backend> SqlStore<DB> {
    /// Run `handler` at most once per key, **exactly once in effect** for writes it makes in the
    /// transaction it is given: the transactional form, without the attribute.
    ///
    /// Begins a transaction on this store's pool, claims the key for it, replays a done key,
    /// refuses or waits for one in flight (as `opts` says), otherwise runs
    /// `handler` with the transaction. On `Ok(v)` the done mark (with `v` for replay) is written in
    /// the transaction and the transaction commits: the handler's writes and the mark commit
    /// together or not at all. On `Err`, a panic or cancellation the transaction rolls back and the
    /// key is free again.
    ///
    /// What each outcome means here:
    /// - `Ok(v)`: the effect and the mark committed (or `v` was replayed: nothing ran).
    /// - [`Error::LeaseLost`]: this caller lost its claim (MySQL/MariaDB, where the claim is a
    ///   lease outside the transaction: it lapsed and was taken over); its transaction was rolled
    ///   back, so its effect did not happen.
    /// - [`Error::Unavailable`] in [`Phase::Complete`]: the mark or the commit failed; the
    ///   transaction was rolled back, unless the commit's reply was lost, in which case the key is
    ///   done and a redelivery replays.
    /// - A crash at any point: the transaction rolls back with the connection; the redelivery runs
    ///   the handler again (MySQL/MariaDB: once the lease expires).
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")]
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use idem_runtime::{Call, Options, SqlStore, sqlx};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// enum AppError {
    ///     #[error(transparent)]
    ///     Idem(#[from] idem_runtime::Error),
    ///     #[error(transparent)]
    ///     Db(#[from] sqlx::Error),
    /// }
    ///
    /// let path = std::env::temp_dir().join(format!("idem-doc-{}.db", std::process::id()));
    /// let url = format!("sqlite://{}?mode=rwc", path.display());
    /// let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    /// sqlx::query("CREATE TABLE IF NOT EXISTS coupons (order_id TEXT, code TEXT)").execute(&pool).await.unwrap();
    /// let store = SqlStore::new(pool);
    /// store.migrate().await.unwrap();
    ///
    /// let opts = Options::new("coupons::issue");
    /// for _delivery in 0..3 {
    ///     let code: Result<String, AppError> = store
    ///         .run_in_tx(&opts, Call::new("order-7"), |tx| Box::pin(async move {
    ///             // The handler's writes go through `tx`: they commit with the done mark.
    ///             sqlx::query("INSERT INTO coupons VALUES ('order-7', 'C-1')")
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok("C-1".to_string())
    ///         }))
    ///         .await;
    ///     assert_eq!(code.unwrap(), "C-1"); // the 2nd and 3rd deliveries replay
    /// }
    /// let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coupons").fetch_one(store.pool()).await.unwrap();
    /// assert_eq!(rows, 1);
    /// # drop(store);
    /// # let _ = std::fs::remove_file(&path);
    /// # });
    /// ```
    pub async fn run_in_tx<R, F>(&self, opts: &Options, call: Call, handler: F) -> R
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        let pool = &self.inner.pool;
        run_owned(self, self, None, pool, opts, call, handler)
            .await
            .0
    }

    /// [`run_in_tx`](Self::run_in_tx) with a transaction the caller began (e.g. with its own
    /// isolation level: `pool.begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")`). It is
    /// committed when the handler ran and its mark was written, and rolled back otherwise (when
    /// the key is replayed, in flight or refused, the handler does not run).
    pub async fn run_with_tx<R, F>(
        &self,
        tx: Transaction<'static, DB>,
        opts: &Options,
        call: Call,
        handler: F,
    ) -> R
    where
        R: Outcome,
        R::Ok: Replayable,
        R::Err: AbsorbsIdemError,
        F: for<'t> FnOnce(&'t mut Transaction<'static, DB>) -> TxFuture<'t, R>,
    {
        let pool = &self.inner.pool;
        run_owned(self, self, Some(tx), pool, opts, call, handler)
            .await
            .0
    }
}
