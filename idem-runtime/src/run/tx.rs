//! The transactional form: the done mark is written in the handler's own SQL transaction, so the
//! handler's writes and the mark commit together or not at all.
//!
//! # What happens, step by step
//!
//! 1. **Claim.** The store claims the key for this transaction ([`TxStore::begin_in`]). On
//!    PostgreSQL and SQLite the claim is made *in* the transaction (PostgreSQL: a
//!    transaction-scoped advisory lock taken without waiting, then the key's row; SQLite: the
//!    key's row, under the database's write lock): the transaction itself is the lease, so it
//!    cannot lapse while the transaction is open, needs no renewal, and ends with it (commit,
//!    rollback, or a crash that drops the connection). On MySQL/MariaDB the claim is made on
//!    another connection, renewed by idem's watchdog, and fenced by the mark's token check.
//!    A duplicate of a done key is replayed; one in flight is refused (or waits, with `wait`).
//! 2. **Run** the handler with the transaction.
//! 3. **Mark.** Before the handler runs, idem takes a savepoint in the transaction. On `Ok(v)`
//!    the done mark with `v` is written in the transaction, checked against the lease's token,
//!    and the savepoint released. **The caller commits** (as with any function that takes
//!    `&mut tx`). If the mark cannot be written (the lease was taken over, or the database
//!    failed), idem rolls back to the savepoint before returning the error: the handler's writes
//!    are undone, whatever the caller does next, and the caller's own earlier writes are kept.
//! 4. On `Err` the handler's writes are rolled back to the savepoint too, the claim is released
//!    (in the transaction: a commit frees the key), and the error is returned.
//!
//! If the caller rolls back (or its commit fails) after `Ok`, the claim rolls back with the mark:
//! the key is free at once (MySQL/MariaDB: when the lease lapses, at the latest after `ttl`).
//! Nothing can leave a done mark without its effect, or an effect without its mark.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use super::{CatchUnwind, Claimant, Finish, claim, lift, request, store_error};
use crate::codec;
use crate::lease::{self, Held};
use crate::store::{Lease, StoreHandle, TxStore};
use crate::{AbsorbsIdemError, Call, Error, Key, Options, Outcome, Phase, Replayable, metrics};

/// A connection the transactional form can write the done mark on: a `sqlx::Transaction` (what
/// `pool.begin()` gives), or a database connection that is inside a transaction.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a SQL transaction idem can write its done mark in",
    label = "the parameter named by `tx` must be `&mut` a sqlx transaction",
    note = "take the transaction as `tx: &mut sqlx::Transaction<'_, Postgres>` (or `MySql`, `Sqlite`), or `&mut PgConnection` inside a transaction"
)]
pub trait TxConnection: Send {
    /// The connection, type-erased, and whether it is inside a transaction.
    #[doc(hidden)]
    fn as_tx(&mut self) -> (&mut (dyn Any + Send), bool);
}

/// What `#[idempotent(tx = "...")]` calls: the handler's body takes the transaction and hands it
/// back when it is done, so the done mark can be written in it.
#[doc(hidden)]
pub async fn run_tx_future<'c, S, C, R, F, Fut>(
    store: &S,
    opts: &Options,
    call: Call,
    tx: &'c mut C,
    as_tx: AsTx<C>,
    body: F,
) -> R
where
    S: StoreHandle + ?Sized,
    C: ?Sized,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce(&'c mut C) -> Fut,
    Fut: Future<Output = (R, &'c mut C)>,
{
    let store = match store.store() {
        Ok(s) => s,
        Err(e) => return lift(opts, e),
    };
    let Some(txs) = store.transactional() else {
        return lift(
            opts,
            Error::NotTransactional {
                reason: "this store keeps no SQL table: use a SqlStore, or a LayeredStore over one"
                    .into(),
            },
        );
    };
    if !as_tx(tx).1 {
        return lift(
            opts,
            Error::NotTransactional {
                reason:
                    "the connection is not inside a transaction: pass `&mut tx` from `pool.begin()`"
                        .into(),
            },
        );
    }
    execute_tx(store, txs, opts, call, None, tx, as_tx, body, &mut None).await
}

/// How the wrapper reaches the connection inside the transaction parameter. A function pointer
/// made by [`tx_access`], so that a parameter that is not a transaction is reported once, on it.
pub(crate) type AsTx<C> = fn(&mut C) -> (&mut (dyn Any + Send), bool);

/// The [`AsTx`] of the transaction parameter `_tx` (its type is all that is used).
#[doc(hidden)]
pub fn tx_access<C: TxConnection + ?Sized>(_tx: &C) -> AsTx<C> {
    C::as_tx
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
/// Claim outside any transaction (for a store whose transactional claim is made outside it), so
/// the caller can begin its transaction only once the key is theirs.
pub(crate) async fn claim_outside<R>(
    store: &dyn crate::Store,
    opts: &Options,
    call: &Call,
) -> Result<(Key, Lease), R>
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
{
    let (key, fingerprint) = match call.parts() {
        Ok(parts) => parts,
        Err(e) => return Err(lift(opts, e)),
    };
    let req = request(std::process::id(), opts, &key, fingerprint);
    let lease = claim::<R>(store, Claimant::Store(store), opts, &req).await?;
    Ok((key, lease))
}

/// A done mark written in a transaction: what a caller that commits it may copy elsewhere (the
/// layered store's front).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]
pub(crate) struct Marked {
    pub(crate) scope: String,
    pub(crate) key: Key,
    pub(crate) lease: Lease,
    pub(crate) output: Arc<[u8]>,
    pub(crate) keep: std::time::Duration,
}

/// The transactional form's core (see the module docs). The store's own `begin` is used only to
/// wait for an in-flight holder.
// Internal: the two entry points (the attribute, `run_in_tx`) pass what they each have.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn execute_tx<'c, C, R, F, Fut>(
    store: &dyn crate::Store,
    txs: &dyn TxStore,
    opts: &Options,
    call: Call,
    claimed: Option<Lease>,
    tx: &'c mut C,
    as_tx: AsTx<C>,
    body: F,
    marked: &mut Option<Marked>,
) -> R
where
    C: ?Sized,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce(&'c mut C) -> Fut,
    Fut: Future<Output = (R, &'c mut C)>,
{
    let (key, fingerprint) = match call.into_parts() {
        Ok(parts) => parts,
        Err(e) => return lift(opts, e),
    };
    let pid = std::process::id();
    let req = request(pid, opts, &key, fingerprint);
    let lease = match claimed {
        Some(lease) => lease,
        None => match claim::<R>(store, Claimant::Tx(txs, as_tx(tx).0), opts, &req).await {
            Ok(lease) => lease,
            Err(answer) => return answer,
        },
    };

    let held = Held::new(opts.scope.clone(), key, lease);
    let (scope, key) = (&*held.scope, &held.key);
    // The handler's writes can be undone apart from the caller's: a savepoint after the claim.
    if let Err(e) = txs.savepoint_in(as_tx(tx).0).await {
        release_in(txs, as_tx(tx).0, scope, key, &lease).await;
        return lift(opts, store_error(e, Phase::Begin, scope, key));
    }
    let renewer = txs.renewer_in_tx();
    let watch = renewer
        .clone()
        .map(|r| lease::watch(pid, &held, r, opts.ttl, opts.max_lease));
    // Dropped before the end (cancelled, or a panic): a claim made outside the transaction is
    // released from the watchdog's thread; one made inside ends with the transaction.
    let mut guard = Finish::holding(&held, renewer, opts);
    let outcome = held.scope(CatchUnwind { inner: body(tx) }).await;

    let (result, tx) = match outcome {
        Ok((result, tx)) => (result.into_result(), tx),
        Err(panic) => {
            // The transaction was not handed back: the caller's unwinding rolls it back; the
            // guard releases a claim made outside it.
            metrics::record(opts, metrics::Outcome::Panicked);
            drop(watch);
            drop(guard);
            std::panic::resume_unwind(panic)
        }
    };
    let value = match result {
        Ok(value) => value,
        Err(e) => {
            // The handler's writes go, and the key is free: a caller that commits anyway commits
            // nothing of the handler's.
            drop(watch);
            metrics::record(opts, metrics::Outcome::HandlerError);
            undo(txs, as_tx(tx).0, scope, key).await;
            release_in(txs, as_tx(tx).0, scope, key, &lease).await;
            guard.done();
            return R::from_result(Err(e));
        }
    };
    // The handler's writes are in the transaction; from here on the mark must join them, or
    // neither may commit. A drop now leaves the claim to the transaction (or to its ttl). The
    // lease stays renewed until the mark is written.
    guard.done();
    let output: Arc<[u8]> = codec::encode(&value, opts.max_output).into();
    let mark = txs
        .complete_in(as_tx(tx).0, scope, key, &lease, &output, opts.keep)
        .await;
    drop(watch);
    match mark {
        Ok(()) => {
            if let Err(e) = txs.release_savepoint_in(as_tx(tx).0).await {
                // Harmless: the transaction's end releases it.
                tracing::debug!(scope, key = %key, error = %e, "savepoint not released");
            }
            txs.marked_in(scope, key, &lease).await;
            metrics::record(opts, metrics::Outcome::Executed);
            *marked = Some(Marked {
                scope: scope.to_owned(),
                key: key.clone(),
                lease,
                output,
                keep: opts.keep,
            });
            R::from_result(Ok(value))
        }
        Err(e) => {
            tracing::error!(scope, key = %key, error = %e, "the done mark could not be written in the handler's transaction: its writes are rolled back");
            undo(txs, as_tx(tx).0, scope, key).await;
            // Free the key for a redelivery, unless another holder has it.
            if !matches!(e, crate::StoreError::LeaseLost) {
                release_in(txs, as_tx(tx).0, scope, key, &lease).await;
            }
            lift(opts, store_error(e, Phase::Complete, scope, key))
        }
    }
}

/// Roll the handler's writes back to the savepoint taken before it ran.
async fn undo(txs: &dyn TxStore, tx: &mut (dyn Any + Send), scope: &str, key: &Key) {
    if let Err(e) = txs.rollback_to_savepoint_in(tx).await {
        // The transaction is broken or gone (a lost connection, a deadlock victim): the database
        // rolled it back whole, the handler's writes with it.
        tracing::warn!(scope, key = %key, error = %e, "could not roll back to the savepoint; the transaction is gone");
    }
}

async fn release_in(
    txs: &dyn TxStore,
    tx: &mut (dyn Any + Send),
    scope: &str,
    key: &Key,
    lease: &Lease,
) {
    if let Err(e) = txs.release_in(tx, scope, key, lease).await {
        tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when the transaction ends or its lease expires");
    }
}
