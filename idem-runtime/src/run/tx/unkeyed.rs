//! The transactional form for a call without a key ([`Call::unkeyed`](crate::Call::unkeyed)):
//! no claim and no mark, but the handler's writes are still undone to a savepoint of idem's when
//! it fails, as for a keyed call, so a caller that commits after the error commits none of them;
//! and an `Ok` whose savepoint cannot be released (the transaction is aborted) is
//! `TransactionAborted`, not `Ok`.

use std::future::Future;

use super::{AsTx, savepoint_name};
use crate::run::lift;
use crate::store::StoreHandle;
use crate::{AbsorbsIdemError, Error, Key, Options, Outcome, Phase, StoreError};

/// Run `body` in the caller's transaction inside a savepoint: released on `Ok`, rolled back to on
/// `Err`.
pub(super) async fn execute_unkeyed_tx<'c, S, C, R, F, Fut>(
    store: &S,
    opts: &Options,
    tx: &'c mut C,
    as_tx: AsTx<C>,
    body: F,
) -> R
where
    S: StoreHandle + ?Sized,
    C: ?Sized,
    R: Outcome,
    R::Err: AbsorbsIdemError,
    F: FnOnce(&'c mut C) -> Fut,
    Fut: Future<Output = (R, &'c mut C)>,
{
    tracing::debug!(
        "no key: the handler runs as a plain call in the transaction, not deduplicated"
    );
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
    let savepoint = savepoint_name();
    if let Err(e) = txs.savepoint_in(as_tx(tx).0, &savepoint).await {
        return lift(opts, keyless(e, opts));
    }
    let (out, tx) = body(tx).await;
    let out = out.into_result();
    let undone = match &out {
        Ok(_) => txs.release_savepoint_in(as_tx(tx).0, &savepoint).await,
        Err(_) => txs.rollback_to_savepoint_in(as_tx(tx).0, &savepoint).await,
    };
    match undone {
        Ok(()) => R::from_result(out),
        // After `Err` the writes could not be undone to the savepoint; after `Ok` the savepoint
        // could not be released (the handler left the transaction aborted: 25P02), so its
        // writes will not commit. Either way nothing of them may commit, and `Ok` would lie.
        Err(e) => {
            tracing::error!(scope = &*opts.scope, error = %e, "could not roll back to (or release) idem's savepoint: rolling the whole transaction back");
            let conn = as_tx(tx).0;
            let id = conn.identity();
            if let Err(e) = txs.abort_in(conn).await {
                tracing::warn!(scope = &*opts.scope, error = %e, "rolling the transaction back failed too");
            }
            // The calls around this one in that transaction lost their writes too.
            crate::lease::Held::abort_enclosing_on(id);
            lift(
                opts,
                Error::TransactionAborted {
                    scope: opts.scope.to_string(),
                    key: no_key(),
                    reason: e.to_string(),
                },
            )
        }
    }
}

/// What a call without a key reports a failed savepoint as.
fn keyless(e: StoreError, opts: &Options) -> Error {
    match e {
        StoreError::Unavailable(source) => Error::Unavailable {
            phase: Phase::Begin,
            source,
        },
        StoreError::Unsupported(reason) => Error::NotTransactional { reason },
        StoreError::TransactionGone(reason) => Error::TransactionAborted {
            scope: opts.scope.to_string(),
            key: no_key(),
            reason,
        },
        other => Error::Unavailable {
            phase: Phase::Begin,
            source: Box::new(other),
        },
    }
}

/// The key a call without one is reported under.
fn no_key() -> Key {
    Key::new("(no key)").expect("a valid key")
}
