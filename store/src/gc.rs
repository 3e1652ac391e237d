//! Garbage collection: delete artifacts no Profile references any more.
//!
//! Profiles are listed cluster-wide; an artifact is kept when a Profile names its digest (or its
//! URL ends with it) or when it is younger than the grace period (an upload precedes the Profile
//! that will reference it). When the Profiles cannot be listed nothing is deleted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kprof_crds::Profile;
use kube::api::ListParams;
use kube::{Api, Client};

use super::backend::{Artifacts, Digest};
use super::{State, StoreError};

/// The digests every Profile in the cluster references (paginated list).
pub async fn referenced_digests(client: &Client) -> Result<HashSet<Digest>, kube::Error> {
    let api: Api<Profile> = Api::all(client.clone());
    let mut out = HashSet::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list(&lp).await?;
        for p in &page.items {
            let a = &p.spec.artifacts;
            for r in [&a.pprof, &a.flamegraph, &a.summary].into_iter().flatten() {
                out.extend(Digest::parse(&r.digest));
                out.extend(Digest::from_url(&r.url));
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    Ok(out)
}

/// What one collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub kept: usize,
    pub young: usize,
    pub deleted: Vec<Digest>,
}

/// Delete the artifacts that are neither referenced nor younger than `grace`.
pub async fn collect(
    artifacts: &Artifacts,
    referenced: &HashSet<Digest>,
    grace: Duration,
) -> Result<GcReport, StoreError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut report = GcReport::default();
    for obj in artifacts.list().await? {
        if referenced.contains(&obj.digest) {
            report.kept += 1;
        } else if now - obj.last_modified < grace.as_secs() as i64 {
            report.young += 1;
        } else {
            artifacts.delete(&obj.digest).await?;
            report.deleted.push(obj.digest);
        }
    }
    Ok(report)
}

/// One collection against the cluster.
pub async fn run_once(
    artifacts: &Artifacts,
    client: &Client,
    grace: Duration,
) -> Result<GcReport, StoreError> {
    let referenced = referenced_digests(client).await?;
    collect(artifacts, &referenced, grace).await
}

/// Collect every `gc_interval`, forever.
pub(crate) async fn run(state: Arc<State>) {
    let mut tick = tokio::time::interval(state.config.gc_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.metrics.gc_runs.inc();
        match run_once(&state.artifacts, &state.client, state.config.gc_grace).await {
            Ok(r) => {
                state.metrics.gc_deleted.inc_by(r.deleted.len() as u64);
                tracing::info!(
                    kept = r.kept,
                    young = r.young,
                    deleted = r.deleted.len(),
                    "store garbage collection"
                );
            }
            Err(e) => {
                state.metrics.error("gc");
                tracing::warn!(error = %e, "store garbage collection skipped");
            }
        }
    }
}
