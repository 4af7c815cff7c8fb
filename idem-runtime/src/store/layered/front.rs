//! Calls to the front: through the gate and its timeout, the copy of done marks, the backfill
//! from the durable store, and the release of claims nobody runs.

use std::time::Duration;

use std::sync::atomic::Ordering;

use super::gate::{Missed, Pass, ProbeGuard};
use super::{Inner, LayeredStore, REBEGIN_TTL};
use crate::store::{Begin, BeginRequest, Lease, Store, Token};
use crate::{Fingerprint, Key, StoreError};

impl<F: Store, D: Store> LayeredStore<F, D> {
    /// Release `token`'s claim in the front in the background, quietly and bounded by the front
    /// timeout: the front was just seen failing, so this is a courtesy, not part of the answer.
    pub(super) fn spawn_front_release(&self, scope: &str, key: &Key, token: Token) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, scope, key) = (self.clone(), scope.to_owned(), key.clone());
        runtime.spawn(async move {
            let lease = Lease { token, fence: 0 };
            let inner = &*store.inner;
            let release = inner.front.release(&scope, &key, &lease);
            if let Ok(Err(e)) | Err(e) = tokio::time::timeout(inner.cfg.front_timeout, release)
                .await
                .map_err(|_| StoreError::unavailable("timed out"))
            {
                tracing::debug!(scope, key = %key, error = %e, "front claim not released; it expires with its lease");
            }
        });
    }
}

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
        let pass = self.gate.pass();
        if pass == Pass::Skip {
            self.degraded(op);
            return Err(Missed::Skipped);
        }
        // A probe that is cancelled must not leave the gate waiting for it forever.
        let _probe = (pass == Pass::Probe).then(|| ProbeGuard(&self.gate));
        let (missed, failure) = match tokio::time::timeout(self.cfg.front_timeout, call()).await {
            Ok(Err(StoreError::Unavailable(e))) => (Missed::Failed, e.to_string()),
            Err(_) => (
                Missed::Failed,
                format!("no answer within {:?}", self.cfg.front_timeout),
            ),
            Ok(answer) => {
                if pass == Pass::Probe {
                    self.gate.recovered();
                }
                return Ok(answer);
            }
        };
        self.front_failures.fetch_add(1, Ordering::Relaxed);
        self.gate.failed(pass, self.cfg.front_backoff, op, &failure);
        self.degraded(op);
        Err(missed)
    }

    pub(super) fn degraded(&self, op: &'static str) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ::metrics::counter!("idem_store_degraded_total", "op" => op).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = op;
    }

    /// Release a claim this store holds in the front, best effort.
    pub(super) async fn front_release(&self, scope: &str, key: &Key, lease: &Lease) {
        let released = self
            .front_op("release", || self.front.release(scope, key, lease))
            .await;
        if let Ok(Err(e)) = released {
            tracing::debug!(scope, key = %key, error = %e, "front release failed; its lease expires")
        }
    }

    /// Record a durable done mark in the front, so duplicates are answered there. `tracked` is
    /// what [`Leases::take`] knew of the lease: `None` when it does not know the lease's
    /// fingerprint, and then nothing is written (a record without its fingerprint could replay to
    /// a payload the durable record refuses); the front's claim is released instead.
    pub(super) async fn front_mark(
        &self,
        scope: &str,
        key: &Key,
        lease: &Lease,
        output: &[u8],
        keep: Duration,
        tracked: Option<Option<Fingerprint>>,
    ) {
        let keep = keep.min(self.cfg.front_keep);
        let written = match tracked {
            None => return self.front_release(scope, key, lease).await,
            Some(None) => {
                self.front_op("complete", || {
                    self.front.complete(scope, key, lease, output, keep)
                })
                .await
            }
            // Claim again with the fingerprint first: if the front lost our claim meanwhile, a bare
            // complete would write a record without it.
            Some(Some(fp)) => {
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

    /// Begin in the durable store alone (the front is down or could not answer).
    pub(super) async fn durable_begin(&self, req: &BeginRequest<'_>) -> Result<Begin, StoreError> {
        let answer = self.durable.begin(req).await?;
        if let Begin::Acquired(lease) = &answer {
            self.leases.insert(lease.token, req.fingerprint);
        }
        Ok(answer)
    }

    /// The front claimed a key that the durable store has done: copy the record into the front
    /// (completing the front's claim), so the next duplicates are answered there.
    pub(super) async fn backfill(&self, req: &BeginRequest<'_>, front: Lease, output: &[u8]) {
        let (scope, key) = (req.scope, req.key);
        // The front's claim carries the request's fingerprint, which the durable record accepted
        // (it has the same one, or none): a record with it replays to no payload the durable one
        // refuses. A request without one would give a record without one, which is right only if
        // the durable record has none either: ask it with a fingerprint nothing has.
        let safe = req.fingerprint.is_some()
            || {
                let probe = BeginRequest {
                    fingerprint: Some(Fingerprint(Token::generate().0.to_be_bytes())),
                    ..*req
                };
                match self.durable.begin(&probe).await {
                    Ok(Begin::Completed { .. }) => true,
                    // The record expired in between and the probe claimed the key: give it back.
                    Ok(Begin::Acquired(lease)) => {
                        if let Err(e) = self.durable.release(scope, key, &lease).await {
                            tracing::warn!(scope, key = %key, error = %e, "could not release a probe's claim; it expires with its lease");
                        }
                        false
                    }
                    Ok(Begin::Mismatch | Begin::InFlight { .. }) | Err(_) => false,
                }
            };
        if !safe {
            return self.front_release(scope, key, &front).await;
        }
        let keep = self.cfg.backfill_keep.min(self.cfg.front_keep);
        match self
            .front_op("complete", || {
                self.front.complete(scope, key, &front, output, keep)
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
pub(super) struct FrontClaim<'a, F: Store> {
    pub(super) front: &'a F,
    pub(super) req: &'a BeginRequest<'a>,
    pub(super) lease: Option<Lease>,
}

impl<F: Store> Drop for FrontClaim<'_, F> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.front
                .release_detached(self.req.scope, self.req.key, lease);
        }
    }
}
