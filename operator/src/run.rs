//! Wiring: the shared watches and caches, leader election, the target controller and the agent
//! reconciler. [`Operator::run`] is what `kprof-operator run` calls and what the tests start
//! in-process against a real API server.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Future, StreamExt};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, Pod, PodSpec, PodStatus},
};
use kprof_crds::{Profile, labels};
use kube::{
    Api, Client,
    core::DeserializeGuard,
    runtime::{
        Controller, WatchStreamExt,
        controller::Config as ControllerConfig,
        events::{Recorder, Reporter},
        reflector, watcher,
    },
};
use tokio::sync::{Notify, oneshot, watch};

use crate::{
    AGENT_NAME, CONTROLLER_NAME, Error, OperatorConfig, Result,
    http::Health,
    leader::LeaseLock,
    metrics::Metrics,
    reconcile::{
        daemonset::AgentScheduler,
        target::{self, Context, Guarded, MatchIndex, read::Caches},
    },
};

/// At most this many targets are reconciled at the same time.
const CONCURRENCY: u16 = 16;
/// How long in-flight reconciles may take to finish after a stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// One operator process.
pub struct Operator {
    pub client: Client,
    pub config: OperatorConfig,
    /// The namespace the operator runs in: agent DaemonSet and leader Lease live here.
    pub namespace: String,
    /// This replica's name in the Lease and in Events (the pod name in a cluster).
    pub identity: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Operator {
    pub fn new(client: Client, config: OperatorConfig, namespace: &str, identity: &str) -> Self {
        Self {
            client,
            config,
            namespace: namespace.into(),
            identity: identity.into(),
            metrics: Arc::default(),
            health: Arc::default(),
        }
    }

    /// Run until `shutdown` completes (then finish in-flight reconciles, release the lease and
    /// return `Ok`), or until leadership is lost (`Err(LeadershipLost)`: the process should exit).
    ///
    /// Everything runs inside the returned future (no detached task): dropping it stops the
    /// operator at once, like killing the process.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let signal = async {
            shutdown.await;
            stop_tx.send_replace(true);
            futures::future::pending::<()>().await;
        };
        tokio::select! {
            res = self.lead(stop_rx) => res,
            () = signal => unreachable!("pending never completes"),
        }
    }

    async fn lead(&self, stop_rx: watch::Receiver<bool>) -> Result<()> {
        let le = &self.config.leader_election;
        let lease = le.enabled.then(|| {
            LeaseLock::new(
                self.client.clone(),
                &self.namespace,
                &le.lease_name,
                &self.identity,
                le.lease_duration
                    .to_std()
                    .unwrap_or(Duration::from_secs(15)),
                le.renew_interval.to_std().unwrap_or(Duration::from_secs(5)),
            )
        });
        let Some(lease) = lease else {
            self.run_controllers(stop_rx).await;
            return Ok(());
        };
        self.health.set_standby();
        tracing::info!(lease = %lease.name, namespace = %self.namespace, identity = %self.identity, "waiting for the leader lease");
        let mut stop = stop_rx.clone();
        tokio::select! {
            () = lease.acquire() => {}
            () = stopped(&mut stop) => return Ok(()),
        }
        self.metrics.leader.set(1);
        let lost = tokio::select! {
            () = self.run_controllers(stop_rx) => false,
            () = lease.hold() => true,
        };
        self.metrics.leader.set(0);
        self.health.set_starting();
        if lost {
            return Err(Error::LeadershipLost);
        }
        lease.release().await;
        tracing::info!("operator stopped");
        Ok(())
    }

    async fn run_controllers(&self, stop: watch::Receiver<bool>) {
        let client = self.client.clone();
        let agent_trigger = Arc::new(Notify::new());

        // ProfilingTargets (optionally only those matching targetSelector).
        let mut tcfg = watcher::Config::default().any_semantic();
        if !self.config.target_selector.is_empty() {
            tcfg = tcfg.labels(&self.config.target_selector);
        }
        let (targets, tw) = reflector::store::<Guarded>();
        let target_stream = watcher(Api::<Guarded>::all(client.clone()), tcfg)
            .default_backoff()
            .reflect(tw)
            .inspect(poke(&agent_trigger))
            .applied_objects();

        // Pods of every namespace, trimmed to what selection needs.
        let (pods, pw) = reflector::store::<Pod>();
        let pod_stream = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .modify(trim_pod)
        .default_backoff()
        .reflect(pw)
        .inspect(poke(&agent_trigger))
        .touched_objects();

        // Profiles written for a target, trimmed to what status and retention need.
        let (profiles, prw) = reflector::store::<DeserializeGuard<Profile>>();
        let profile_stream = watcher(
            Api::<DeserializeGuard<Profile>>::all(client.clone()),
            watcher::Config::default()
                .any_semantic()
                .labels(labels::TARGET),
        )
        .modify(trim_profile)
        .default_backoff()
        .reflect(prw)
        .touched_objects();

        // The agent DaemonSet.
        let (agents, dw) = reflector::store::<DaemonSet>();
        let ds_stream = watcher(
            Api::<DaemonSet>::namespaced(client.clone(), &self.namespace),
            watcher::Config::default().fields(&format!("metadata.name={AGENT_NAME}")),
        )
        .modify(|d| d.metadata.managed_fields = None)
        .default_backoff()
        .reflect(dw)
        .inspect(poke(&agent_trigger))
        .touched_objects();

        let matched = Arc::new(MatchIndex::default());
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: Some(self.identity.clone()),
            },
        );
        let caches = Caches {
            pods: pods.clone(),
            profiles: profiles.clone(),
            agents: agents.clone(),
        };
        let ctx = Arc::new(Context::new(
            client.clone(),
            &self.namespace,
            caches,
            recorder,
            self.metrics.clone(),
            agent_trigger.clone(),
            self.config.resync(),
            matched.clone(),
        ));

        let (ctrl_stop_tx, ctrl_stop_rx) = oneshot::channel::<()>();
        let forward_stop = {
            let mut stop = stop.clone();
            async move {
                stopped(&mut stop).await;
                let _ = ctrl_stop_tx.send(());
            }
        };
        let controller = Controller::for_stream(target_stream, targets.clone())
            .with_config(
                ControllerConfig::default()
                    .concurrency(CONCURRENCY)
                    .debounce(Duration::from_millis(50)),
            )
            .watches_stream(pod_stream, target::pod_mapper(targets.clone(), matched))
            .watches_stream(profile_stream, target::profile_mapper)
            .watches_stream(ds_stream, target::agent_mapper(targets.clone()))
            .graceful_shutdown_on(async move {
                let _ = ctrl_stop_rx.await;
            })
            .run(target::reconcile, target::error_policy, ctx)
            .for_each(|res| async move {
                match res {
                    Ok(_) => {}
                    Err(kube::runtime::controller::Error::ReconcilerFailed(e, obj)) => {
                        tracing::debug!(object = %obj, error = %e, "reconcile failed");
                    }
                    // A trigger (pod, Profile) for a target deleted meanwhile: nothing to do.
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        tracing::debug!(object = %obj, "target gone before its reconcile");
                    }
                    Err(e) => tracing::warn!(error = %e, "controller error"),
                }
            });

        let scheduler = Arc::new(AgentScheduler::new(
            client.clone(),
            &self.namespace,
            self.config.agent.clone(),
            targets.clone(),
            pods.clone(),
            agents.clone(),
            agent_trigger,
            self.metrics.clone(),
            self.config.resync(),
        ));
        // After a stop, in-flight reconciles get SHUTDOWN_GRACE to finish. Before the caches
        // have synced there is nothing to finish (and kube's runner waits for the target
        // cache, which is no longer fed once its trigger stream stops): drop it at once.
        let synced = Arc::new(AtomicBool::new(false));
        let controller = {
            let (mut stop, synced) = (stop.clone(), synced.clone());
            async move {
                let deadline = async {
                    stopped(&mut stop).await;
                    if synced.load(Ordering::SeqCst) {
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                        tracing::warn!(
                            "reconciles did not finish within {SHUTDOWN_GRACE:?} of the stop: abandoning them"
                        );
                    }
                };
                tokio::select! {
                    () = controller => {}
                    () = deadline => {}
                }
            }
        };
        let health = self.health.clone();
        let ready = {
            let mut stop = stop.clone();
            async move {
                let all_synced = async {
                    let _ = tokio::join!(
                        targets.wait_until_ready(),
                        pods.wait_until_ready(),
                        profiles.wait_until_ready(),
                        agents.wait_until_ready()
                    );
                    synced.store(true, Ordering::SeqCst);
                    health.set_leading();
                    tracing::info!("caches synced: reconciling");
                };
                tokio::select! {
                    () = all_synced => {}
                    () = stopped(&mut stop) => {}
                }
            }
        };
        tokio::join!(controller, scheduler.run(stop), forward_stop, ready);
    }
}

/// Keep only what selecting pods needs: labels, node, container names, phase.
fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    if let Some(spec) = p.spec.as_mut() {
        *spec = PodSpec {
            node_name: spec.node_name.take(),
            containers: spec
                .containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
    }
    if let Some(st) = p.status.as_mut() {
        *st = PodStatus {
            phase: st.phase.take(),
            ..Default::default()
        };
    }
}

/// Keep only what status and retention need.
fn trim_profile(p: &mut DeserializeGuard<Profile>) {
    match &mut p.0 {
        Ok(p) => {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            p.spec.top_functions.clear();
            p.spec.warnings.clear();
            p.spec.pids.clear();
            p.spec.artifacts = Default::default();
        }
        Err(e) => e.metadata.managed_fields = None,
    }
}

/// Wake every watch event: the agent reconciler recomputes after any target, pod or
/// DaemonSet change.
fn poke<T>(n: &Arc<Notify>) -> impl FnMut(&T) + Send + 'static {
    let n = n.clone();
    move |_| n.notify_one()
}

/// Completes once `rx` turns true (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
