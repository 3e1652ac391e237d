//! Leader election with a `coordination.k8s.io/v1` Lease, so that two replicas are safe: only
//! the holder of the lease runs the controllers.
//!
//! The protocol is the one client-go uses: the holder renews `renewTime` every
//! `renewInterval`; anyone may take the lease over once `renewTime + leaseDurationSeconds` has
//! passed. Every write is a `replace` carrying the `resourceVersion` read just before, so of two
//! candidates racing for an expired lease exactly one wins (the other gets 409 Conflict). A
//! leader that cannot renew before its lease expires stops working (it must assume another
//! replica took over); on a clean shutdown it releases the lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};

use crate::{Error, Result};

/// What a candidate should do with the lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it over.
    TakeOver,
    /// Someone else holds it until about `until`.
    Wait { holder: String, until: Timestamp },
}

/// Decide from the lease (`None`: absent), our identity and the time (pure).
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let renewed = spec
        .renew_time
        .or(spec.acquire_time)
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let until = renewed.saturating_add(duration).unwrap_or(Timestamp::MAX);
    if until <= now {
        Decision::TakeOver
    } else {
        Decision::Wait { holder, until }
    }
}

/// The lease as `me` holding it at `now` (pure), starting from the stored one.
pub fn held(
    stored: Option<&Lease>,
    name: &str,
    namespace: &str,
    me: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> Lease {
    let mut lease = stored.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: None,
    });
    let old = lease.spec.take().unwrap_or_default();
    let ours = old.holder_identity.as_deref() == Some(me);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(me.into()),
        lease_duration_seconds: Some(
            i32::try_from(lease_duration.as_secs())
                .unwrap_or(i32::MAX)
                .max(1),
        ),
        acquire_time: if ours {
            old.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            old.lease_transitions.unwrap_or(0) + i32::from(!ours && stored.is_some()),
        ),
        ..Default::default()
    });
    lease
}

/// A candidate for one Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
        renew_interval: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration,
            renew_interval,
        }
    }

    /// One attempt to acquire or renew; `Ok(true)` when we hold the lease afterwards.
    pub async fn try_acquire(&self) -> Result<bool> {
        let stored = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::kube("reading the leader lease"))?;
        let now = Timestamp::now();
        let decision = decide(stored.as_ref(), &self.identity, now);
        let write = held(
            stored.as_ref(),
            &self.name,
            &self.namespace,
            &self.identity,
            self.lease_duration,
            now,
        );
        let res = match decision {
            Decision::Wait { .. } => return Ok(false),
            Decision::Create => self.api.create(&PostParams::default(), &write).await,
            Decision::Renew | Decision::TakeOver => {
                self.api
                    .replace(&self.name, &PostParams::default(), &write)
                    .await
            }
        };
        match res {
            Ok(_) => {
                if decision == Decision::TakeOver || decision == Decision::Create {
                    tracing::info!(lease = %self.name, identity = %self.identity, "acquired the leader lease");
                }
                Ok(true)
            }
            // Another candidate wrote first: it is the leader.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::kube("writing the leader lease")(e)),
        }
    }

    /// Wait until we hold the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.renew_interval).await;
        }
    }

    /// Renew every `renew_interval` until renewing has failed for a whole lease duration or
    /// someone else holds the lease; returns then (leadership is lost).
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                // A write conflict is not proof of a new holder (anyone may touch the object):
                // look before giving up.
                Ok(false) => match self.api.get_opt(&self.name).await {
                    Ok(Some(l))
                        if decide(Some(&l), &self.identity, Timestamp::now())
                            == Decision::Renew => {}
                    Err(e) => tracing::warn!(error = %e, "reading the leader lease failed"),
                    Ok(_) => {
                        tracing::error!(lease = %self.name, "the leader lease is held by another replica");
                        return;
                    }
                },
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
            // Stop before the lease can expire in another replica's eyes.
            if last_ok.elapsed() + self.renew_interval >= self.lease_duration {
                tracing::error!(lease = %self.name, "could not renew the leader lease in time");
                return;
            }
        }
    }

    /// Give the lease up (clean shutdown) so a standby takes over without waiting.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn lease(holder: Option<&str>, renewed: &str, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(ts(renewed))),
                lease_duration_seconds: Some(secs),
                lease_transitions: Some(2),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now = ts("2026-01-01T00:00:10Z");
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(
                Some(&lease(Some("a"), "2026-01-01T00:00:00Z", 15)),
                "a",
                now
            ),
            Decision::Renew
        );
        assert_eq!(
            decide(
                Some(&lease(Some("b"), "2026-01-01T00:00:00Z", 15)),
                "a",
                now
            ),
            Decision::Wait {
                holder: "b".into(),
                until: ts("2026-01-01T00:00:15Z")
            }
        );
        assert_eq!(
            decide(
                Some(&lease(Some("b"), "2026-01-01T00:00:00Z", 10)),
                "a",
                now
            ),
            Decision::TakeOver,
            "expired"
        );
        assert_eq!(
            decide(Some(&lease(None, "2026-01-01T00:00:09Z", 15)), "a", now),
            Decision::TakeOver,
            "released"
        );
    }

    #[test]
    fn taking_over_counts_a_transition_renewing_does_not() {
        let now = ts("2026-01-01T00:01:00Z");
        let stored = lease(Some("b"), "2026-01-01T00:00:00Z", 15);
        let l = held(Some(&stored), "l", "ns", "a", Duration::from_secs(15), now);
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_transitions, Some(3));
        assert_eq!(s.acquire_time, Some(MicroTime(now)));
        let mine = lease(Some("a"), "2026-01-01T00:00:55Z", 15);
        let s = held(Some(&mine), "l", "ns", "a", Duration::from_secs(15), now)
            .spec
            .unwrap();
        assert_eq!(s.lease_transitions, Some(2));
        assert_eq!(s.renew_time, Some(MicroTime(now)));
        let fresh = held(None, "l", "ns", "a", Duration::from_secs(15), now);
        assert_eq!(fresh.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(fresh.spec.unwrap().lease_transitions, Some(0));
    }
}
