//! Calls to the front: through the gate and its timeout, the copy of done marks, the backfill
//! from the durable store, and the release of claims nobody runs.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::gate::{Missed, Pass, ProbeGuard};
use super::{FRONT_RELEASE_RETRIES_FOR, Inner, REBEGIN_TTL};
use crate::lease::spawn_background;
use crate::store::{Begin, BeginRequest, Lease, Store};
use crate::{Key, StoreError};

impl<F: Store, D: Store> Inner<F, D> {
    /// Run one front operation through the gate and the timeout. `Err`: the front did not
    /// answer (skipped, failed or timed out), and this operation counts as degraded.
    pub(super) async fn front_op<T, Fut>(
        &self,
        op: &'static str,
        call: impl FnOnce() -> Fut,
    ) -> Result<Result<T, StoreError>, Missed>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let gate = &self.health.gate;
        let pass = gate.pass();
        if pass == Pass::Skip {
            self.degraded(op);
            return Err(Missed::Skipped);
        }
        // A probe that is cancelled must not leave the gate waiting for it forever.
        let _probe = (pass == Pass::Probe).then(|| ProbeGuard(gate));
        let (missed, failure) = match tokio::time::timeout(self.cfg.front_timeout, call()).await {
            Ok(Err(StoreError::Unavailable(e))) => (Missed::Failed, e.to_string()),
            Err(_) => (
                Missed::Failed,
                format!("no answer within {:?}", self.cfg.front_timeout),
            ),
            Ok(answer) => {
                if pass == Pass::Probe {
                    gate.recovered();
                }
                return Ok(answer);
            }
        };
        self.health.front_failures.fetch_add(1, Ordering::Relaxed);
        gate.failed(pass, self.cfg.front_backoff, op, &failure);
        self.degraded(op);
        Err(missed)
    }

    pub(super) fn degraded(&self, op: &'static str) {
        self.health.degraded.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ::metrics::counter!("idem_store_degraded_total", "op" => op).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = op;
    }

    /// Release a claim this store holds in the front, best effort: when the front does not
    /// answer, again from the watchdog's thread for a while, so that it does not answer "in
    /// flight" for a key the durable store has freed until the claim's lease ends.
    pub(super) async fn front_release(&self, scope: &str, key: &Key, lease: &Lease) {
        let released = self
            .front_op("release", || self.front.release(scope, key, lease))
            .await;
        match released {
            Ok(Ok(())) => {}
            Ok(Err(StoreError::Unavailable(_))) | Err(Missed::Failed) => {
                self.release_front_later(scope, key, *lease)
            }
            Ok(Err(e)) => {
                tracing::debug!(scope, key = %key, error = %e, "front release failed; its lease expires")
            }
            Err(Missed::Skipped) => {}
        }
    }

    /// Record a durable done mark in the front, so duplicates are answered there.
    pub(super) async fn front_mark(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
    ) {
        let keep = keep.min(self.cfg.front_keep);
        let written = match lease.fingerprint {
            None => {
                self.front_op("complete", || {
                    self.front.complete(scope, key, lease, output, keep)
                })
                .await
            }
            // Claim again with the fingerprint first: if the front lost our claim meanwhile, a
            // record written without the claim could lose the check on some stores.
            Some(fp) => {
                self.front_op("complete", || async move {
                    let again = BeginRequest {
                        scope,
                        key,
                        token: lease.token,
                        ttl: REBEGIN_TTL,
                        fingerprint: Some(fp),
                    };
                    match self.front.begin(&again).await? {
                        Begin::Acquired(_) => {
                            self.front.complete(scope, key, lease, output, keep).await
                        }
                        // Another caller holds the front's claim, or the front is done already.
                        _ => Ok(()),
                    }
                })
                .await
            }
        };
        if let Ok(Err(e)) = written {
            // LeaseLost: another caller claimed the front meanwhile; it will find the durable
            // record and backfill. Anything else: the front stays without the record.
            tracing::debug!(scope, key = %key, error = %e, "done mark not copied to the front");
        }
    }

    /// Renew the front's claim alongside the durable lease, best effort. When the front lost it
    /// (flush, restart), claim it again, so in-flight duplicates are refused by the front instead
    /// of each reaching the durable store.
    pub(super) async fn front_extend(&self, scope: &str, key: &Key, lease: &Lease, ttl: Duration) {
        let renewed = self
            .front_op("extend", || self.front.extend(scope, key, lease, ttl))
            .await;
        if let Ok(Err(StoreError::LeaseLost)) = renewed {
            // Briefly at first: the holder may have released the key (durable store first, then
            // the front) after this renewal began, and then the claim belongs to no one. It is
            // made long only once the durable lease is found still held; if that check fails
            // or never ends (the watchdog gives up on a renewal after ttl / 3), it lapses soon.
            let again = BeginRequest {
                scope,
                key,
                token: lease.token,
                ttl: ttl.min(Duration::from_secs(1)),
                fingerprint: lease.fingerprint,
            };
            let claimed = self.front_op("extend", || self.front.begin(&again)).await;
            if let Ok(Ok(Begin::Acquired(_))) = claimed {
                match self.durable.extend(scope, key, lease, ttl).await {
                    Ok(()) => {
                        let _ = self
                            .front_op("extend", || self.front.extend(scope, key, lease, ttl))
                            .await;
                    }
                    Err(StoreError::LeaseLost) => self.front_release(scope, key, lease).await,
                    Err(_) => {}
                }
            }
        }
    }

    /// The layered `begin`: the front first; when it claims, the durable store (`durable_begin`:
    /// its `begin`, or its claim in a transaction: `in_tx`) decides.
    pub(super) async fn begin_via<Fut>(
        &self,
        req: &BeginRequest<'_>,
        in_tx: bool,
        durable_begin: impl FnOnce() -> Fut,
    ) -> Result<Begin, StoreError>
    where
        Fut: Future<Output = Result<Begin, StoreError>>,
    {
        let front = match self.front_op("begin", || self.front.begin(req)).await {
            Ok(Ok(Begin::Acquired(lease))) => lease,
            // Replay, in flight, mismatch: the front's answer is enough.
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                // Corrupt (foreign data under the front's key): the durable record decides.
                tracing::warn!(scope = req.scope, key = %req.key, error = %e, "front could not answer begin; asking the durable store");
                self.degraded("begin");
                return durable_begin().await;
            }
            Err(Missed::Skipped) => return durable_begin().await,
            Err(Missed::Failed) => {
                // A front call that failed or timed out may still have claimed the key: give it
                // back if the front answers soon, so it does not report the key in flight for a
                // whole ttl.
                self.release_front_later(req.scope, req.key, req.lease(0));
                return durable_begin().await;
            }
        };
        // If this call is dropped before the durable store answers, give the front's claim back.
        let mut claim = FrontClaim {
            inner: self,
            req,
            lease: Some(front),
        };
        let durable = durable_begin().await;
        claim.lease = None;
        match durable {
            Ok(Begin::Acquired(lease)) => Ok(Begin::Acquired(lease)),
            // Read outside any transaction: committed, so the front may answer with it.
            Ok(Begin::Completed {
                output,
                fingerprint,
            }) if !in_tx => {
                self.backfill(req, front, &output, fingerprint).await;
                Ok(Begin::Completed {
                    output,
                    fingerprint,
                })
            }
            // Read inside the caller's transaction: perhaps its own mark, not committed, and
            // nothing read there may reach the front before the commit. Only the record as
            // committed (read outside, without waiting for the transaction) is copied.
            Ok(Begin::Completed {
                output,
                fingerprint,
            }) => {
                let committed = match self.durable.transactional() {
                    Some(d) => d.committed_done(req.scope, req.key).await,
                    None => Ok(None),
                };
                match committed {
                    Ok(Some((stored, kept))) => self.backfill(req, front, &stored, kept).await,
                    _ => self.front_release(req.scope, req.key, &front).await,
                }
                Ok(Begin::Completed {
                    output,
                    fingerprint,
                })
            }
            // In flight elsewhere (e.g. claimed while the front was down), mismatch, or an error:
            // the durable answer stands, and the front must not keep a claim nobody runs.
            other => {
                self.front_release(req.scope, req.key, &front).await;
                other
            }
        }
    }

    /// Release `lease`'s claim in the front from the watchdog's thread, quietly, each attempt
    /// bounded by the front timeout, retried for a while when the front does not answer: the
    /// front was just seen failing (or the caller is gone), so this is a courtesy, not part of an
    /// answer.
    pub(super) fn release_front_later(&self, scope: &str, key: &Key, lease: Lease) {
        let front = self.front.for_watchdog();
        let timeout = self.cfg.front_timeout;
        let (scope, key) = (scope.to_owned(), key.clone());
        spawn_background(async move {
            let give_up = tokio::time::Instant::now() + FRONT_RELEASE_RETRIES_FOR;
            let mut pause = Duration::from_millis(50);
            loop {
                let release = front.release(&scope, &key, &lease);
                match tokio::time::timeout(timeout, release).await {
                    Ok(Ok(())) => return,
                    Ok(Err(StoreError::Unavailable(_))) | Err(_)
                        if tokio::time::Instant::now() + pause < give_up =>
                    {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(scope, key = %key, error = %e, "front claim not released; it expires with its lease");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(scope, key = %key, "front claim not released; it expires with its lease");
                        return;
                    }
                }
            }
        });
    }

    /// The front claimed a key that the durable store has done: copy the record into the front
    /// (completing the front's claim) with the record's own fingerprint, so the next duplicates
    /// are answered there, as the durable record would answer them.
    pub(super) async fn backfill(
        &self,
        req: &BeginRequest<'_>,
        front: Lease,
        output: &[u8],
        fingerprint: Option<crate::Fingerprint>,
    ) {
        let (scope, key) = (req.scope, req.key);
        let record = Lease {
            fingerprint,
            ..front
        };
        let keep = self.cfg.backfill_keep.min(self.cfg.front_keep);
        match self
            .front_op("complete", || {
                self.front.complete(scope, key, &record, output, keep)
            })
            .await
        {
            Ok(Ok(())) => {
                tracing::debug!(scope, key = %key, "front had lost a done record: backfilled")
            }
            Ok(Err(e)) => {
                tracing::debug!(scope, key = %key, error = %e, "front backfill failed")
            }
            Err(_) => {}
        }
    }
}

/// The front's claim, released in the background if `begin` is dropped before the durable store
/// answered.
struct FrontClaim<'a, F: Store, D: Store> {
    inner: &'a Inner<F, D>,
    req: &'a BeginRequest<'a>,
    lease: Option<Lease>,
}

impl<F: Store, D: Store> Drop for FrontClaim<'_, F, D> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.inner
                .release_front_later(self.req.scope, self.req.key, lease);
        }
    }
}
