//! The transactional form: the done mark is written in the handler's own SQL transaction, so the
//! handler's writes and the mark commit together or not at all.
//!
//! # What happens, step by step
//!
//! 1. **Savepoint and claim.** idem takes a savepoint of its own in the transaction (a name no
//!    other call uses, so nested calls on one transaction nest), and the store claims the key
//!    for this transaction ([`TxStore::begin_in`]). On PostgreSQL and SQLite the claim is made
//!    *in* the transaction, after the savepoint (PostgreSQL: a transaction-scoped advisory lock
//!    taken without waiting, then the key's row; SQLite: the key's row, under the database's
//!    write lock): the transaction itself is the lease, so it cannot lapse while the transaction
//!    is open, needs no renewal, and ends with it (commit, rollback, or a crash that drops the
//!    connection). On MySQL/MariaDB the claim is made outside the transaction, through a pool of
//!    the store's own (never a second connection of the pool the caller's transaction holds),
//!    renewed by idem's watchdog from its grant on, and fenced by the mark's token check; the
//!    savepoint follows it. A duplicate of a done key is replayed; one in flight is refused (or
//!    waits, with `wait`); either way what the claim took in the transaction is rolled back to
//!    the savepoint.
//! 2. **Run** the handler with the transaction.
//! 3. **Mark.** On `Ok(v)` the done mark with `v` is written in the transaction, checked against
//!    the lease's token, and the savepoint released. **The caller commits** (as with any function
//!    that takes `&mut tx`). If the mark cannot be written (the lease was taken over, or the
//!    database failed), idem rolls back to the savepoint before returning the error: the
//!    handler's writes are undone, whatever the caller does next, and the caller's own earlier
//!    writes are kept.
//! 4. On `Err` the handler's writes are rolled back to the savepoint too, and with them a claim
//!    made in the transaction, so the key is free at once, even while the caller keeps the
//!    transaction open (a claim made outside it is released); nested calls that marked their
//!    keys under this call are undone with it, and their keys freed. The error is returned.
//!
//! If rolling back to the savepoint fails, idem rolls the whole transaction back on the server
//! and answers [`Error::TransactionAborted`]: nothing of the handler's can commit.
//!
//! If the caller rolls back (or its commit fails) after `Ok`, the claim rolls back with the mark:
//! the key is free at once (MySQL/MariaDB: when the lease lapses, at the latest after `ttl`).
//! Nothing can leave a done mark without its effect, or an effect without its mark, with one
//! duty left to the caller: a call that was cancelled (a timeout around it) or whose panic was
//! caught must be followed by a rollback (dropping the transaction does it). idem no longer
//! holds the transaction then; committing it would keep the handler's writes and an in-flight
//! claim without the mark, and a redelivery after `ttl` would run the handler again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    CatchUnwind, Claimant, Finish, Granted, Refusal, call_span, claim, confirm, encode_output,
    lift, record_key, release_later, request, shadowed, store_error, taken_over,
};
use crate::lease::{self, Held, Outside};
use crate::observe::CallOutcome;
use crate::store::{Lease, StoreHandle, TxStore};
use crate::{AbsorbsIdemError, Call, Error, Key, Options, Outcome, Phase, Replayable, metrics};
use tracing::Instrument;

mod conn;
mod unkeyed;
pub(crate) use conn::AsTx;
pub use conn::{TxConnection, TxRef, tx_access};

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
    // The span first: a call refused before the store is asked has one too.
    async move {
        if !call.is_keyed() {
            return unkeyed::execute_unkeyed_tx(store, opts, tx, as_tx, body).await;
        }
        let store = match store.store() {
            Ok(s) => s,
            Err(e) => return lift(opts, e),
        };
        let Some(txs) = store.transactional() else {
            return lift(
                opts,
                Error::NotTransactional {
                    reason:
                        "this store keeps no SQL table: use a SqlStore, or a LayeredStore over one"
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
        execute_tx(store, txs, opts, call, None, tx, as_tx, body, None).await
    }
    .instrument(call_span(opts))
    .await
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
/// Claim outside any transaction (for a store whose transactional claim is made outside it), so
/// the caller can begin its transaction only once the key is theirs.
pub(crate) async fn claim_outside<R>(
    store: &dyn crate::Store,
    opts: &Options,
    call: &Call,
) -> Result<Option<(Key, Granted)>, R>
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
{
    let (key, fingerprint) = match call.parts() {
        Ok(parts) => parts,
        Err(e) => return Err(lift(opts, e)),
    };
    record_key(&key);
    let req = request(std::process::id(), opts, &key, fingerprint);
    let claiming = metrics::Timer::start();
    match claim::<R>(store, Claimant::Store(store), opts, &req).await {
        Ok(granted) => Ok(Some((key, granted))),
        Err(Refusal::Answer(answer)) => {
            // Timed here: no handler runs, so `execute_tx` never times this claim.
            claiming.stop(opts, "claim");
            Err(answer)
        }
        // Shadow mode: the transactional call claims again, and runs anyway.
        Err(Refusal::Shadow(_)) => Ok(None),
    }
}

/// Where a claim in the transaction takes the whole database's write lock (SQLite, see
/// [`TxStore::replays_committed_first`]), a duplicate of a key done and committed is answered
/// before the claim (and, for `run_in_tx`, before a transaction is begun), from a plain read:
/// duplicates then cost what the plain store's do, and do not queue behind every writer. A done
/// record stays done, so this is the answer the claim would give. `None` (go on as before) for
/// anything else: a key not done, a bad key, a failed read, shadow mode.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) async fn replay_committed<R>(txs: &dyn TxStore, opts: &Options, call: &Call) -> Option<R>
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
{
    if !txs.replays_committed_first() || crate::shadow() {
        return None;
    }
    let (key, fingerprint) = call.parts().ok()?;
    let claiming = metrics::Timer::start();
    let (output, kept) = txs.committed_done(&opts.scope, &key).await.ok()??;
    record_key(&key);
    let answer = match (kept, fingerprint) {
        (Some(a), Some(b)) if a != b => super::claim::mismatched(opts, &opts.scope, &key),
        _ => super::claim::replayed(opts, &opts.scope, &key, &output),
    };
    claiming.stop(opts, "claim");
    Some(answer)
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

tokio::task_local! {
    /// Inside `run_in_tx`'s handler, whose commit is not known yet: the first runs of the
    /// transactional calls nested in it (on its task), counted once it is (`Executed` if it
    /// commits, `CommitFailed` if not: their marks and writes went with it).
    pub(crate) static NESTED: std::cell::RefCell<Vec<Options>>;
}

/// What `execute_tx` tells a caller that owns the commit (`run_in_tx`): the mark to copy once
/// committed, and whether there is anything to commit at all. Such a caller records the outcome
/// (`Executed`, or `CommitFailed`) once its commit is known, not `execute_tx` at the mark.
#[derive(Default)]
pub(crate) struct Owned {
    pub(crate) marked: Option<Marked>,
    /// Shadow mode let the handler run (or its mark failed) and it returned `Ok`: its writes
    /// are committed, as they would be without idem.
    pub(crate) commit: bool,
    /// The caller looked for a committed done record already (`replay_committed`), before it
    /// began the transaction: not again.
    #[cfg_attr(
        not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
        allow(dead_code)
    )]
    pub(crate) peeked: bool,
}

/// A savepoint name no other call uses: nested calls on one transaction must not share one
/// (MySQL/MariaDB replace a savepoint of the same name, so an inner call's release would remove
/// the outer call's).
fn savepoint_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("idem_sp_{}", NEXT.fetch_add(1, Ordering::Relaxed))
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
    claimed: Option<Granted>,
    tx: &'c mut C,
    as_tx: AsTx<C>,
    body: F,
    mut owner: Option<&mut Owned>,
) -> R
where
    C: ?Sized,
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
    F: FnOnce(&'c mut C) -> Fut,
    Fut: Future<Output = (R, &'c mut C)>,
{
    #[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
    if claimed.is_none()
        && !owner.as_deref().is_some_and(|o| o.peeked)
        && let Some(answer) = replay_committed::<R>(txs, opts, &call).await
    {
        return answer;
    }
    let (key, fingerprint) = match call.into_parts() {
        Ok(parts) => parts,
        Err(e) => return lift(opts, e),
    };
    record_key(&key);
    let pid = std::process::id();
    let req = request(pid, opts, &key, fingerprint);
    let in_tx = txs.claims_in_tx();
    let savepoint = savepoint_name();
    let scope = &*opts.scope;
    // Where the claim is made in the transaction, the savepoint comes first: undoing the
    // handler's writes then undoes the claim too, and frees the key at once (PostgreSQL's
    // advisory lock is released with it), even while the caller keeps the transaction open.
    if in_tx && let Err(e) = txs.savepoint_in(as_tx(tx).0, &savepoint).await {
        return lift(opts, store_error(e, Phase::Begin, scope, &key));
    }
    let claiming = metrics::Timer::start();
    let granted = match claimed {
        Some(granted) => granted,
        None => match claim::<R>(store, Claimant::Tx(txs, as_tx(tx).0), opts, &req).await {
            Ok(granted) => granted,
            Err(refusal) => {
                claiming.stop(opts, "claim");
                // Replayed or refused: give back what the claim took in the transaction.
                if in_tx && let Err(e) = txs.rollback_to_savepoint_in(as_tx(tx).0, &savepoint).await
                {
                    return aborted(txs, as_tx(tx).0, opts, &key, e).await;
                }
                return match refusal {
                    Refusal::Answer(answer) => answer,
                    Refusal::Shadow(would) => {
                        let run = async { body(tx).await.0 };
                        let out = shadowed(opts, &key, would, run).await.into_result();
                        if let Some(owner) = owner.as_deref_mut() {
                            owner.commit = out.is_ok();
                        }
                        R::from_result(out)
                    }
                };
            }
        },
    };
    claiming.stop(opts, "claim");
    let lease = granted.lease;
    let renewer = txs.renewer_in_tx();
    let held = Held::new(opts.scope.clone(), key, lease);
    held.tx.store(as_tx(tx).0.identity(), Ordering::Relaxed);
    let key = &held.key;
    // A claim held outside the transaction is a lease: renewed from its grant on, and confirmed
    // before the handler runs if the grant was read late.
    let watch = renewer
        .clone()
        .map(|r| lease::watch(pid, &held, r, opts.ttl, opts.max_lease, granted.asked));
    // Dropped before the end (cancelled, or a panic): a claim made outside the transaction is
    // released from the watchdog's thread; one made inside ends with the transaction.
    let mut guard = Finish::holding(&held, renewer.clone(), watch, opts);
    let fence = Some(lease.fence);
    tracing::Span::current().record("fence", lease.fence);
    if !in_tx {
        if let Some(renewer) = &renewer {
            match confirm(renewer, &held, opts.ttl, granted.asked).await {
                Ok(()) => {}
                Err(crate::StoreError::LeaseLost) => {
                    guard.done();
                    return lift(opts, taken_over(opts, key));
                }
                // The guard releases the claim in the background.
                Err(e) => return lift(opts, store_error(e, Phase::Begin, scope, key)),
            }
        }
        if let Err(e) = txs.savepoint_in(as_tx(tx).0, &savepoint).await {
            return lift(opts, store_error(e, Phase::Begin, scope, key));
        }
    }
    tracing::trace!("handler started");
    let running = metrics::Timer::start();
    let outcome = held.scope(CatchUnwind { inner: body(tx) }).await;
    running.stop(opts, "handler");
    held.finishing();

    let (result, tx) = match outcome {
        Ok((result, tx)) => (result.into_result(), tx),
        Err(panic) => {
            // The transaction was not handed back: the caller's unwinding rolls it back; the
            // guard releases a claim made outside it.
            metrics::record(opts, CallOutcome::Panicked, Some(key), fence);
            release_nested_later(&held);
            drop(guard);
            std::panic::resume_unwind(panic)
        }
    };
    // A call nested in this one found the transaction gone and rolled it back: this handler's
    // writes went with it, whatever it returned. It must not mark, nor may the calls around it.
    let result = match result {
        Ok(_) if held.is_aborted() => {
            // Recorded once, by `aborted`.
            release_nested(&held).await;
            if let Some(renewer) = &renewer {
                release_in(txs, as_tx(tx).0, renewer, scope, key, &lease, opts.ttl).await;
            }
            guard.done();
            let gone = crate::StoreError::TransactionGone(
                "a call nested in this one found it gone and rolled it back".into(),
            );
            return aborted(txs, as_tx(tx).0, opts, key, gone).await;
        }
        other => other,
    };
    let value = match result {
        Ok(value) => value,
        Err(e) => {
            // The handler's writes go (and a claim made in the transaction with them), and the
            // key is free: a caller that commits anyway commits nothing of the handler's.
            let undone = txs.rollback_to_savepoint_in(as_tx(tx).0, &savepoint).await;
            release_nested(&held).await;
            free_key(
                txs,
                as_tx(tx).0,
                renewer.as_ref(),
                scope,
                key,
                &lease,
                opts.ttl,
            )
            .await;
            guard.done();
            if let Err(e) = undone {
                return aborted(txs, as_tx(tx).0, opts, key, e).await;
            }
            metrics::record(opts, CallOutcome::HandlerError, Some(key), fence);
            return R::from_result(Err(e));
        }
    };
    // The handler's writes are in the transaction; from here on the mark must join them, or
    // neither may commit. The lease stays renewed until the mark is written.
    let output: Arc<[u8]> = encode_output(&value, opts, scope, key).into();
    let marking = metrics::Timer::start();
    let mark = txs
        .complete_in(as_tx(tx).0, scope, key, &lease, &output, opts.keep)
        .await;
    marking.stop(opts, "mark");
    // A drop from here on leaves the claim to the transaction (or to its ttl).
    guard.done();
    match mark {
        Ok(()) => {
            if let Err(e) = txs.release_savepoint_in(as_tx(tx).0, &savepoint).await {
                // The savepoint is gone: the handler ended the transaction itself (or the
                // connection broke), so its writes are not in it and the mark may have been
                // written outside it. Not `Ok`: the caller must not take this for a commit.
                release_nested(&held).await;
                return aborted(txs, as_tx(tx).0, opts, key, e).await;
            }
            txs.marked_in(scope, key, &lease).await;
            adopt_nested(&held, renewer.as_ref(), opts);
            let marked = Marked {
                scope: scope.to_owned(),
                key: key.clone(),
                lease,
                output,
                keep: opts.keep,
            };
            match owner {
                // The outcome is the commit's, recorded by the owner.
                Some(owner) => owner.marked = Some(marked),
                None => {
                    metrics::note(opts, CallOutcome::Executed, Some(key), fence);
                    // Nested in `run_in_tx`: counted once its commit is known.
                    if NESTED
                        .try_with(|n| n.borrow_mut().push(opts.clone()))
                        .is_err()
                    {
                        metrics::count(opts, CallOutcome::Executed);
                    }
                }
            }
            R::from_result(Ok(value))
        }
        // Shadow mode too: the writes go with the mark (a database that failed the mark may
        // have aborted the transaction, PostgreSQL always does), and the error says so. Unlike
        // the plain form, nothing of the handler's happened, so its redelivery is its one run.
        Err(e) => {
            tracing::error!(scope, key = %key, error = %e, "the done mark could not be written in the handler's transaction: its writes are rolled back");
            let undone = txs.rollback_to_savepoint_in(as_tx(tx).0, &savepoint).await;
            release_nested(&held).await;
            // Free the key for a redelivery, unless another holder has it.
            if !matches!(e, crate::StoreError::LeaseLost) {
                free_key(
                    txs,
                    as_tx(tx).0,
                    renewer.as_ref(),
                    scope,
                    key,
                    &lease,
                    opts.ttl,
                )
                .await;
            }
            if let Err(undo) = undone {
                return aborted(txs, as_tx(tx).0, opts, key, undo).await;
            }
            lift(opts, store_error(e, Phase::Complete, scope, key))
        }
    }
}

/// Undoing to the savepoint failed: roll the whole transaction back on the server, so nothing of
/// the handler's can commit whatever the caller does next, and say that it cannot be committed.
async fn aborted<R>(
    txs: &dyn TxStore,
    tx: TxRef<'_>,
    opts: &Options,
    key: &Key,
    e: crate::StoreError,
) -> R
where
    R: Outcome,
    R::Err: AbsorbsIdemError,
{
    let scope = &*opts.scope;
    let id = tx.identity();
    tracing::error!(scope, key = %key, error = %e, "could not roll back to idem's savepoint: rolling the whole transaction back");
    if let Err(e) = txs.abort_in(tx).await {
        // The connection is broken or gone: the database rolled the transaction back with it.
        tracing::warn!(scope, key = %key, error = %e, "rolling the transaction back failed too");
    }
    // The calls around this one in that transaction: their writes are gone as well. (One on
    // another transaction keeps its own.)
    lease::Held::abort_enclosing_on(id);
    lift(
        opts,
        Error::TransactionAborted {
            scope: scope.to_owned(),
            key: key.clone(),
            reason: e.to_string(),
        },
    )
}

/// Free the key after this call undid (or, in shadow mode, kept) its writes: a claim made
/// outside the transaction through [`release_in`], one made in it in the transaction.
async fn free_key(
    txs: &dyn TxStore,
    tx: TxRef<'_>,
    renewer: Option<&Arc<dyn crate::Store>>,
    scope: &str,
    key: &Key,
    lease: &Lease,
    ttl: std::time::Duration,
) {
    match renewer {
        Some(renewer) => release_in(txs, tx, renewer, scope, key, lease, ttl).await,
        None => {
            if let Err(e) = txs.release_in(tx, scope, key, lease).await {
                tracing::debug!(scope, key = %key, error = %e, "release in the transaction failed");
            }
        }
    }
}

/// Free a claim made outside the transaction (the caller's transaction holds nothing of it):
/// through the store, and, if it does not answer, again from the watchdog's thread (`renewer`).
async fn release_in(
    txs: &dyn TxStore,
    tx: TxRef<'_>,
    renewer: &Arc<dyn crate::Store>,
    scope: &str,
    key: &Key,
    lease: &Lease,
    ttl: std::time::Duration,
) {
    match txs.release_in(tx, scope, key, lease).await {
        Ok(()) => {}
        Err(crate::StoreError::Unavailable(e)) => {
            tracing::info!(scope, key = %key, error = %e, "release failed; retrying in the background");
            release_later(renewer.clone(), scope.to_owned(), key.clone(), *lease, ttl);
        }
        Err(e) => {
            tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when its lease expires")
        }
    }
}

/// This call undid its writes to its savepoint: the done marks of the nested calls made under it
/// went with them, so the claims those calls hold outside the transaction are released, before
/// this call returns (a redelivery right after its error must find the nested keys free).
/// What the store does not answer for, or what is left when this is dropped, is released from
/// the background.
async fn release_nested(held: &Held) {
    let mut left = ReleaseLater(take_nested(held));
    let mut i = 0;
    while i < left.0.len() {
        let n = &left.0[i];
        match n.releaser.release(&n.scope, &n.key, &n.lease).await {
            Ok(()) => {
                left.0.swap_remove(i);
            }
            Err(crate::StoreError::Unavailable(e)) => {
                tracing::info!(scope = n.scope, key = %n.key, error = %e, "release of a nested claim failed; retrying in the background");
                i += 1;
            }
            Err(e) => {
                tracing::warn!(scope = n.scope, key = %n.key, error = %e, "release of a nested claim failed; the key frees when its lease expires");
                left.0.swap_remove(i);
            }
        }
    }
}

/// [`release_nested`] where nothing can be awaited (a panic unwinding): from the background.
fn release_nested_later(held: &Held) {
    drop(ReleaseLater(take_nested(held)));
}

fn take_nested(held: &Held) -> Vec<Outside> {
    std::mem::take(&mut *held.nested.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Claims made outside the transaction, released from the background when this is dropped.
struct ReleaseLater(Vec<Outside>);

impl Drop for ReleaseLater {
    fn drop(&mut self) {
        for n in self.0.drain(..) {
            release_later(n.releaser, n.scope, n.key, n.lease, n.ttl);
        }
    }
}

/// This call's mark is written in the transaction: the enclosing transactional call (if any)
/// takes over its claim made outside the transaction, and the nested claims it had itself, so
/// that they are released if it undoes its own writes.
fn adopt_nested(held: &Held, renewer: Option<&Arc<dyn crate::Store>>, opts: &Options) {
    let Some(parent) = Held::enclosing() else {
        return;
    };
    let mut mine = take_nested(held);
    if let Some(renewer) = renewer {
        mine.push(Outside {
            releaser: renewer.clone(),
            scope: held.scope.to_string(),
            key: held.key.clone(),
            lease: held.lease,
            ttl: opts.ttl,
        });
    }
    parent
        .nested
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(mine);
}
