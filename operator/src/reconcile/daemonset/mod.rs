//! The agent reconciler: one DaemonSet `kprof-agent` in the operator's namespace, built from
//! all targets at once. Its node affinity covers exactly the nodes that run selected pods of
//! any active target; without an active target it is deleted (zero overhead).
//!
//! It runs as a small loop keyed on the DaemonSet, woken by any change of a target, a pod or
//! the DaemonSet itself (the watches poke a [`Notify`]); pokes that arrive together are
//! coalesced. It reads only the shared caches and makes a request only when something changed.

pub mod apply;
pub mod build;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
    jiff::Timestamp,
};
use kprof_crds::ProfilingTarget;
use kube::{
    Api, Client,
    core::DeserializeGuard,
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::{Notify, watch};

use crate::{AGENT_NAME, Error, Result, config::AgentConfig, error::backoff, metrics::Metrics};

/// How long to wait after a poke for more pokes before recomputing.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What one pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The DaemonSet already matches (or is already absent).
    Unchanged,
    /// Applied, covering this many nodes.
    Applied(usize),
    /// Deleted: no active target.
    Deleted,
}

/// The agent DaemonSet reconciler.
pub struct AgentScheduler {
    pub api: Api<DaemonSet>,
    pub namespace: String,
    pub config: AgentConfig,
    pub targets: Store<DeserializeGuard<ProfilingTarget>>,
    pub pods: Store<Pod>,
    pub agents: Store<DaemonSet>,
    pub trigger: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pub resync: Duration,
    /// Spec hash and generation of the last DaemonSet this process applied.
    last_applied: Mutex<Option<(String, i64)>>,
}

impl AgentScheduler {
    #[allow(
        clippy::too_many_arguments,
        reason = "plain wiring of the shared caches"
    )]
    pub fn new(
        client: Client,
        namespace: &str,
        config: AgentConfig,
        targets: Store<DeserializeGuard<ProfilingTarget>>,
        pods: Store<Pod>,
        agents: Store<DaemonSet>,
        trigger: Arc<Notify>,
        metrics: Arc<Metrics>,
        resync: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            config,
            targets,
            pods,
            agents,
            trigger,
            metrics,
            resync,
            last_applied: Mutex::new(None),
        }
    }

    /// One pass: compute the nodes, then apply, delete or leave the DaemonSet.
    pub async fn reconcile(&self) -> Result<Outcome> {
        let targets = self.targets.state();
        let valid = targets.iter().filter_map(|g| g.0.as_ref().ok());
        let nodes = build::active_nodes(valid, &self.pods.state(), Timestamp::now());
        self.metrics
            .agent_nodes
            .set(i64::try_from(nodes.len()).unwrap_or(i64::MAX));
        let current = self
            .agents
            .get(&ObjectRef::new(AGENT_NAME).within(&self.namespace));
        if nodes.is_empty() {
            *self.last_applied.lock().expect("not poisoned") = None;
            if current.is_none() {
                return Ok(Outcome::Unchanged);
            }
            apply::delete(&self.api).await?;
            tracing::info!(namespace = %self.namespace, "no active ProfilingTarget: deleted the agent DaemonSet");
            return Ok(Outcome::Deleted);
        }
        let mut desired = build::desired_daemonset(&self.config, &self.namespace, &nodes);
        let hash = build::recorded_hash(&desired)
            .unwrap_or_default()
            .to_string();
        desired.metadata.owner_references = self.owner().await?;
        if let Some(cur) = &current {
            let generation = cur.metadata.generation.unwrap_or(0);
            let last = self.last_applied.lock().expect("not poisoned").clone();
            let applied_by_us = last
                .as_ref()
                .is_some_and(|(h, g)| *h == hash && generation <= *g);
            // The cache may lag behind our own apply (older generation): do not apply twice.
            if applied_by_us {
                return Ok(Outcome::Unchanged);
            }
        }
        let applied = apply::apply(&self.api, &desired).await?;
        *self.last_applied.lock().expect("not poisoned") =
            Some((hash, applied.metadata.generation.unwrap_or(0)));
        tracing::info!(namespace = %self.namespace, nodes = nodes.len(), "applied the agent DaemonSet");
        Ok(Outcome::Applied(nodes.len()))
    }

    /// The owner of the DaemonSet: the configured Deployment (the operator's own), looked up for
    /// its uid. A missing Deployment (an operator run outside its chart) means no owner.
    async fn owner(&self) -> Result<Option<Vec<OwnerReference>>> {
        let name = &self.config.owner_deployment;
        if name.is_empty() {
            return Ok(None);
        }
        let deployments: Api<Deployment> =
            Api::namespaced(self.api.clone().into_client(), &self.namespace);
        let found = deployments.get_opt(name).await;
        let Some(deployment) = found.map_err(Error::kube("reading the owner Deployment"))? else {
            tracing::warn!(namespace = %self.namespace, deployment = %name, "owner Deployment not found: the agent DaemonSet has no owner");
            return Ok(None);
        };
        Ok(deployment.metadata.uid.map(|uid| {
            vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: name.clone(),
                uid,
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]
        }))
    }

    /// Run until `stop` turns true: wait for the caches, then reconcile on every poke, at least
    /// every `resync`, retrying failures with backoff.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let ready = async {
            let _ = tokio::join!(
                self.targets.wait_until_ready(),
                self.pods.wait_until_ready(),
                self.agents.wait_until_ready()
            );
        };
        tokio::select! {
            () = ready => {}
            () = crate::run::stopped(&mut stop) => return,
        }
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let res = self.reconcile().await;
            self.metrics
                .observe("agent", started.elapsed(), res.as_ref().err());
            let wait = match res {
                Ok(_) => {
                    failures = 0;
                    self.resync
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, category = e.category(), "agent DaemonSet reconcile failed");
                    backoff(failures)
                }
            };
            tokio::select! {
                () = self.trigger.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep(wait) => {}
                () = crate::run::stopped(&mut stop) => return,
            }
        }
    }
}
