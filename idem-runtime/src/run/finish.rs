//! The done mark and the release: written in the foreground (the mark retried), and finished
//! in the background, on the watchdog's thread, when the call's future is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::codec;
use crate::lease::{self, Held};
use crate::store::{Lease, Store};
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

pub(super) async fn release(store: &dyn Store, scope: &str, key: &Key, lease: &Lease) {
    if let Err(e) = store.release(scope, key, lease).await {
        // Not fatal: the lease expires after its ttl and the key becomes free anyway.
        tracing::warn!(scope, key = %key, error = %e, "release failed; the key frees when its lease expires");
    }
}

/// Finishes a call whose future is dropped (the caller was cancelled: a timeout, a client that
/// hung up) on the watchdog's thread: releases the key while the handler had not succeeded, and
/// writes the done mark once it had, so a redelivery neither waits for the lease nor runs again.
pub(crate) struct Finish<'a> {
    held: &'a Arc<Held>,
    /// Where to finish (a store for the watchdog's thread); `None`: nothing to do (the caller's
    /// transaction holds the claim and ends with it).
    background: Option<Arc<dyn Store>>,
    ttl: Duration,
    keep: Duration,
    state: FinishState,
}

enum FinishState {
    Holding,
    Marking(Arc<[u8]>),
    Done,
}

impl<'a> Finish<'a> {
    pub(crate) fn holding(
        held: &'a Arc<Held>,
        background: Option<Arc<dyn Store>>,
        opts: &Options,
    ) -> Self {
        Finish {
            held,
            background,
            ttl: opts.ttl,
            keep: opts.keep,
            state: FinishState::Holding,
        }
    }

    pub(crate) fn marking(&mut self, output: Arc<[u8]>) {
        self.state = FinishState::Marking(output);
    }

    pub(crate) fn done(&mut self) {
        self.state = FinishState::Done;
    }
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut self.state, FinishState::Done);
        let (Some(store), held) = (self.background.take(), self.held.clone()) else {
            return;
        };
        match state {
            FinishState::Done => {}
            FinishState::Holding => {
                tracing::debug!(scope = %held.scope, key = %held.key, "cancelled while holding the lease: releasing in the background");
                lease::spawn_background(async move {
                    release(&*store, &held.scope, &held.key, &held.lease).await;
                });
            }
            FinishState::Marking(output) => {
                let (ttl, keep) = (self.ttl, self.keep);
                lease::spawn_background(async move {
                    complete_in_background(&*store, &held, &output, ttl, keep).await;
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
