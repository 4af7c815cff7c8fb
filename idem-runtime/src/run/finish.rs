//! The done mark and the release: written in the foreground (the mark retried), and finished
//! in the background, on the watchdog's thread, when the call's future is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::codec;
use crate::lease::{self, Held, Watch};
use crate::store::{BeginRequest, Lease, Store, TxStore};
use crate::{Key, Options, StoreError};

/// Attempts at the done mark in the foreground before the call reports `Unavailable`.
const COMPLETE_ATTEMPTS: u32 = 3;

/// Outputs at least this large that a store keeps refusing are taken to be refused for their size.
/// Below it, a refusal is a store that is down: the output is never given up for it.
const REFUSED_FOR_SIZE: usize = 64 * 1024;

/// Write the done mark. `complete` is idempotent, so a failure is retried. A large output the
/// store keeps refusing while it answers otherwise (one larger than it accepts fails the same way
/// every time) is given up: the key is marked done without it, so the handler is not run again on
/// every delivery. A store that is down is never taken for one that refuses the output.
pub(super) async fn complete(
    store: &dyn Store,
    scope: &str,
    key: &Key,
    lease: &Lease,
    output: &[u8],
    ttl: Duration,
    keep: Duration,
) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match store.complete(scope, key, lease, output, keep).await {
            Err(StoreError::Unavailable(e)) if attempt + 1 < COMPLETE_ATTEMPTS => {
                attempt += 1;
                tracing::warn!(scope, key = %key, error = %e, attempt, "complete failed; retrying");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(StoreError::Unavailable(e))
                if output.len() >= REFUSED_FOR_SIZE && !codec::is_unreplayable(output) =>
            {
                // Is the store up? A small write answers (whatever it says of the lease). Down:
                // keep the output, and let the caller (or the background) try again later.
                if let Err(StoreError::Unavailable(_)) = store.extend(scope, key, lease, ttl).await
                {
                    return Err(StoreError::Unavailable(e));
                }
                // Up: one more try with the output, in case it just came back.
                match store.complete(scope, key, lease, output, keep).await {
                    Err(StoreError::Unavailable(_)) => {}
                    r => return r,
                }
                let without = codec::unreplayable(&format!(
                    "the store refused the output of {} bytes: {e}",
                    output.len()
                ));
                return match store.complete(scope, key, lease, &without, keep).await {
                    Ok(()) => {
                        tracing::warn!(scope, key = %key, error = %e, "the store refused the output; the key is marked done without it");
                        Ok(())
                    }
                    // Still failing: the store itself is down, not the output.
                    Err(_) => Err(StoreError::Unavailable(e)),
                };
            }
            r => return r,
        }
    }
}

/// Free the key after the handler failed (or panicked): now, and, if the store did not answer,
/// again in the background on the watchdog's thread (through `retry`, a store for that thread),
/// for up to the lease's `ttl`. A store that dropped its clients while the handler ran (a
/// failover, a proxy reset) has reconnected by then, so the key is free for the redelivery
/// instead of held by no one until its lease ends.
pub(crate) async fn release(
    store: &dyn Store,
    retry: Option<&Arc<dyn Store>>,
    scope: &str,
    key: &Key,
    lease: &Lease,
    ttl: Duration,
) {
    let released = store.release(scope, key, lease).await;
    if released.is_err() {
        crate::metrics::store_error_in(scope, crate::Phase::Release);
    }
    match released {
        Ok(()) => {}
        Err(StoreError::Unavailable(e)) if retry.is_some() => {
            tracing::info!(scope, key = %key, error = %e, "release failed; retrying in the background");
            if let Some(retry) = retry {
                release_later(retry.clone(), scope.to_owned(), key.clone(), *lease, ttl);
            }
        }
        // Not fatal: the lease expires after its ttl and the key becomes free anyway.
        Err(e) => {
            tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when its lease expires")
        }
    }
}

/// Release `lease` from the watchdog's thread through `store` (one of its stores), retrying while
/// the store is unavailable, for up to `ttl` (the lease is over by then anyway).
pub(crate) fn release_later(
    store: Arc<dyn Store>,
    scope: String,
    key: Key,
    lease: Lease,
    ttl: Duration,
) {
    lease::spawn_background(async move {
        let give_up = Instant::now() + ttl;
        let mut pause = Duration::from_millis(50);
        loop {
            match store.release(&scope, &key, &lease).await {
                Ok(()) => return,
                Err(StoreError::Unavailable(e)) if Instant::now() + pause < give_up => {
                    tracing::debug!(scope, key = %key, error = %e, "background release failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when its lease expires");
                    return;
                }
            }
        }
    });
}

/// A claim sent to the store whose answer is not in: if the call is dropped now, or the answer
/// is an error (a reply that timed out, a connection lost after the request left), the claim
/// may still have been made, and nobody would run it. Its token is then released in the
/// background (token-checked, so harmless if nothing was claimed), so the key is not held by no
/// one for a whole ttl.
pub(crate) struct ClaimSent<'a> {
    releaser: Releaser<'a>,
    req: &'a BeginRequest<'a>,
    armed: bool,
}

/// Who can release a claim made by `begin`: the store (through its store for the watchdog's
/// thread), or, for a claim in a transaction, what renews such claims (`None`: the transaction
/// holds the claim, and it ends with it).
#[derive(Clone, Copy)]
pub(crate) enum Releaser<'a> {
    Store(&'a dyn Store),
    Tx(&'a dyn TxStore),
}

impl<'a> ClaimSent<'a> {
    pub(crate) fn new(releaser: Releaser<'a>, req: &'a BeginRequest<'a>) -> Self {
        ClaimSent {
            releaser,
            req,
            armed: true,
        }
    }

    /// The store answered: what it said holds.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for ClaimSent<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let store = match self.releaser {
            Releaser::Store(s) => Some(s.for_watchdog()),
            Releaser::Tx(t) => t.renewer_in_tx(),
        };
        if let Some(store) = store {
            let req = self.req;
            tracing::debug!(scope = req.scope, key = %req.key, "no answer to a claim: giving its token back in the background");
            let (scope, key, lease) = (req.scope.to_owned(), req.key.clone(), req.lease(0));
            // The request may still land after a first release (it waits in a queue somewhere):
            // released again, at growing intervals, for as long as its lease would last (two
            // minutes at most). Not counted as work to wait for at shutdown: a courtesy.
            let linger = req.ttl.min(Duration::from_secs(120));
            lease::spawn_detached(async move {
                let give_up = Instant::now() + linger;
                let mut pause = Duration::from_millis(50);
                loop {
                    if let Err(e) = store.release(&scope, &key, &lease).await {
                        tracing::debug!(scope, key = %key, error = %e, "giving back an unanswered claim failed");
                    }
                    if Instant::now() + pause >= give_up {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            });
        }
    }
}

/// Finishes a call whose future is dropped (the caller was cancelled: a timeout, a client that
/// hung up) on the watchdog's thread: releases the key while the handler had not succeeded, and
/// writes the done mark once it had (renewing the lease until it is written), so a redelivery
/// neither waits for the lease nor runs again.
pub(crate) struct Finish {
    held: Arc<Held>,
    /// Where to finish (a store for the watchdog's thread); `None`: nothing to do (the caller's
    /// transaction holds the claim and ends with it).
    background: Option<Arc<dyn Store>>,
    /// The lease's renewal: it goes on until the mark or the release is written.
    watch: Option<Watch>,
    ttl: Duration,
    keep: Duration,
    state: FinishState,
}

enum FinishState {
    Holding,
    Marking(Arc<[u8]>),
    Done,
}

impl Finish {
    pub(crate) fn holding(
        held: &Arc<Held>,
        background: Option<Arc<dyn Store>>,
        watch: Option<Watch>,
        opts: &Options,
    ) -> Self {
        Finish {
            held: held.clone(),
            background,
            watch,
            ttl: opts.ttl,
            keep: opts.keep,
            state: FinishState::Holding,
        }
    }

    pub(crate) fn marking(&mut self, output: Arc<[u8]>) {
        self.held.finishing();
        self.state = FinishState::Marking(output);
    }

    /// The mark or the release is written (or given up): renewals stop.
    pub(crate) fn done(&mut self) {
        self.state = FinishState::Done;
        self.watch = None;
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut self.state, FinishState::Done);
        let watch = self.watch.take();
        let (Some(store), held) = (self.background.take(), self.held.clone()) else {
            return;
        };
        match state {
            FinishState::Done => {}
            FinishState::Holding => {
                drop(watch);
                tracing::debug!(scope = %held.scope, key = %held.key, "cancelled while holding the lease: releasing in the background");
                let (scope, key) = (held.scope.to_string(), held.key.clone());
                release_later(store, scope, key, held.lease, self.ttl);
            }
            FinishState::Marking(output) => {
                let (ttl, keep) = (self.ttl, self.keep);
                lease::spawn_background(async move {
                    complete_in_background(&*store, &held, &output, ttl, keep).await;
                    drop(watch);
                });
            }
        }
    }
}

/// Keep trying to write a done mark whose handler succeeded, for about the lease's ttl (after
/// that a redelivery may have taken the key over: the mark would be refused anyway).
async fn complete_in_background(
    store: &dyn Store,
    held: &Held,
    output: &[u8],
    ttl: Duration,
    keep: Duration,
) {
    let (scope, key) = (&*held.scope, &held.key);
    let give_up = Instant::now() + ttl;
    let mut pause = Duration::from_millis(50);
    loop {
        match complete(store, scope, key, &held.lease, output, ttl, keep).await {
            Ok(()) => {
                tracing::info!(scope, key = %key, "done mark written in the background");
                return;
            }
            Err(StoreError::Unavailable(e)) if Instant::now() + pause < give_up => {
                tracing::debug!(scope, key = %key, error = %e, "background done mark failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(scope, key = %key, error = %e, "the handler ran but its done mark could not be written: a redelivery after the lease expires runs it again");
                return;
            }
        }
    }
}
