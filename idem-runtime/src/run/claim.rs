//! Lock and check: the claim loop (`claim`) and what a claim answers instead of a lease (a
//! replay, a refusal), for both forms; and the check that a grant read late is still ours
//! (`confirm`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::finish::{ClaimSent, Releaser};
use super::{AbsorbsIdemError, Outcome, Replayable, lift, store_error};
use crate::codec::{self, Undecodable};
use crate::lease::{self, Held};
use crate::observe::{CallOutcome, Would};
use crate::store::{Begin, BeginRequest, Lease, Store, TxStore};
use crate::{Error, Key, Options, Phase, StoreError, metrics};

/// Where `begin` goes: the store, or the store inside the caller's transaction.
pub(crate) enum Claimant<'a> {
    Store(&'a dyn Store),
    Tx(&'a dyn TxStore, crate::TxRef<'a>),
}

impl<'a> Claimant<'a> {
    /// Whether a key found in flight may be waited for through this claimant.
    fn may_wait(&self) -> bool {
        match self {
            Claimant::Store(_) => true,
            Claimant::Tx(s, _) => s.waits_in_tx(),
        }
    }

    fn releaser(&self) -> Releaser<'a> {
        match self {
            Claimant::Store(s) => Releaser::Store(*s),
            Claimant::Tx(s, _) => Releaser::Tx(*s),
        }
    }

    async fn begin(&mut self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        match self {
            Claimant::Store(s) => s.begin(req).await,
            Claimant::Tx(s, tx) => s.begin_in(tx.reborrow(), req).await,
        }
    }
}

/// A lease the store granted, and when it was asked for: the store's clock started the lease no
/// earlier, so it lasts at least until `asked + ttl`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Granted {
    pub(crate) lease: Lease,
    pub(crate) asked: std::time::Instant,
}

/// Why a claim gives no lease to run on: the answer the caller gets instead (a replayed output,
/// or one of idem's errors), or, in shadow mode, what that answer would have been (the handler
/// then runs without a lease).
pub(crate) enum Refusal<R> {
    Answer(R),
    Shadow(Would),
}

/// Lock and check: claim the key, or return what the caller gets instead of a run (the replayed
/// output, or one of idem's errors). An in-flight key is refused, or waited for (`wait`).
pub(crate) async fn claim<R>(
    store: &dyn Store,
    mut claimant: Claimant<'_>,
    opts: &Options,
    req: &BeginRequest<'_>,
) -> Result<Granted, Refusal<R>>
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
{
    let (scope, key) = (req.scope, req.key);
    let mut wait_deadline = None;
    let mut backoff = Duration::from_millis(5);
    loop {
        let asked = std::time::Instant::now();
        // Dropped before the answer is in (the call was cancelled), or answered with an error:
        // the token is given back, in case the store claimed the key anyway.
        let sent = ClaimSent::new(claimant.releaser(), req);
        let answer = claimant.begin(req).await;
        if !matches!(answer, Err(StoreError::Unavailable(_))) {
            sent.answered();
        }
        let would = match &answer {
            Ok(Begin::Acquired(_)) => None,
            Ok(Begin::Completed { .. }) => Some(Would::Replay),
            Ok(Begin::Mismatch) => Some(Would::RefuseMismatch),
            // Decided below, once waiting (if any) is over.
            Ok(Begin::InFlight { .. }) => None,
            Err(_) => Some(Would::FailClosed),
        };
        if let Some(would) = would
            && crate::shadow()
        {
            return Err(Refusal::Shadow(would));
        }
        match answer {
            Ok(Begin::Acquired(lease)) => {
                tracing::trace!(scope, key = %key, fence = lease.fence, "claimed");
                return Ok(Granted { lease, asked });
            }
            Ok(Begin::Completed { output, .. }) => {
                return Err(Refusal::Answer(replayed(opts, scope, key, &output)));
            }
            Ok(Begin::Mismatch) => return Err(Refusal::Answer(mismatched(opts, scope, key))),
            Ok(Begin::InFlight { retry_after }) => {
                let now = Instant::now();
                let deadline = opts
                    .wait
                    .filter(|_| claimant.may_wait())
                    .map(|w| *wait_deadline.get_or_insert(now + w));
                match deadline {
                    Some(d) if d > now => {
                        let pause = backoff.min(retry_after).min(d - now);
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                        tracing::trace!(scope, key = %key, ?pause, "in flight: waiting for the holder");
                        store.wait(scope, key, pause).await;
                    }
                    _ if crate::shadow() => return Err(Refusal::Shadow(Would::RefuseInFlight)),
                    _ => {
                        tracing::debug!(scope, key = %key, ?retry_after, "duplicate while in flight");
                        return Err(Refusal::Answer(lift(
                            opts,
                            Error::InFlight {
                                scope: scope.to_owned(),
                                key: key.clone(),
                                retry_after,
                            },
                        )));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(scope, key = %key, error = %e, "the store did not answer the claim: the handler does not run");
                return Err(Refusal::Answer(lift(
                    opts,
                    store_error(e, Phase::Begin, scope, key),
                )));
            }
        }
    }
}

/// What a duplicate of a completed key gets: its stored output, decoded.
pub(crate) fn replayed<R>(opts: &Options, scope: &str, key: &Key, output: &[u8]) -> R
where
    R: Outcome,
    R::Ok: Replayable,
    R::Err: AbsorbsIdemError,
{
    tracing::debug!(scope, key = %key, "duplicate of a completed key: replayed");
    match codec::decode::<R::Ok>(output) {
        Ok(v) => {
            metrics::record(opts, CallOutcome::Replayed, Some(key), None);
            R::from_result(Ok(v))
        }
        Err(Undecodable::Unreplayable(reason)) => lift(
            opts,
            Error::Unreplayable {
                scope: scope.to_owned(),
                key: key.clone(),
                reason,
            },
        ),
        Err(Undecodable::Corrupt(reason)) => lift(
            opts,
            Error::Corrupt {
                scope: scope.to_owned(),
                key: key.clone(),
                reason,
            },
        ),
    }
}

/// What a call with a completed key and another payload gets.
pub(crate) fn mismatched<R>(opts: &Options, scope: &str, key: &Key) -> R
where
    R: Outcome,
    R::Err: AbsorbsIdemError,
{
    tracing::info!(scope, key = %key, "same key, another payload: refused");
    lift(
        opts,
        Error::Mismatch {
            scope: scope.to_owned(),
            key: key.clone(),
        },
    )
}

/// A grant read too late was taken over before the handler started: another holder has the key.
pub(crate) fn taken_over(opts: &Options, key: &Key) -> Error {
    Error::InFlight {
        scope: opts.scope.to_string(),
        key: key.clone(),
        retry_after: opts.ttl,
    }
}

/// How many times a grant read too late to run on is claimed again, before the call gives up.
pub(crate) const CONFIRM_ROUNDS: u32 = 3;

/// Whether a lease granted at `asked` may be run on now. At once while less than half its `ttl`
/// has passed (the watchdog renews it from then on); otherwise (the answer was read late: a
/// thread blocked between the store's reply and the wrapper, a slow network) only once a
/// renewal, sent now, confirms that no one took the key over meanwhile. `LeaseLost`: someone did.
pub(crate) async fn confirm(
    renewer: &Arc<dyn Store>,
    held: &Arc<Held>,
    ttl: Duration,
    asked: std::time::Instant,
) -> Result<(), StoreError> {
    let mut since = asked;
    for _ in 0..CONFIRM_ROUNDS {
        if since.elapsed() < ttl / 2 {
            return Ok(());
        }
        tracing::debug!(scope = %held.scope, key = %held.key, late = ?since.elapsed(), "the grant was read late: renewing before the handler runs");
        let sent = std::time::Instant::now();
        lease::renew_now(renewer.clone(), held.clone(), ttl).await?;
        since = sent;
    }
    Err(StoreError::unavailable(
        "the store's answers keep arriving after half the lease has passed",
    ))
}
