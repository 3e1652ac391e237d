//! The operator in-process against the test bed: the CRDs, a test's own operator (whose
//! `targetSelector` sees only the test's targets, and whose agent DaemonSet and Lease live in the
//! test's operator namespace, so tests run in parallel), and [`with_operator_bed`], the set-up
//! every operator test shares.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kprof_crds::{Profile, ProfilingTarget};
use kprof_operator::{
    Operator, OperatorConfig,
    metrics::{ControllerLabels, Metrics},
};
use kube::{
    Api, Client, CustomResourceExt, ResourceExt,
    api::{Patch, PatchParams},
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{TestNamespace, random_suffix};

/// How long an operator test waits for any one thing.
pub const WAIT: Duration = Duration::from_secs(30);
/// Label that ties a target to the run of one test (the operator's `targetSelector`).
pub const RUN_LABEL: &str = "kprof.io/e2e-run";
/// The test bed's pause image: the agent DaemonSet's image in operator tests.
pub const PAUSE_IMAGE: &str = "kprof.local/testbed/pause:1";

/// Apply the kprof CRDs (server-side apply as `field_manager`) and wait until they are served.
pub async fn install_crds(client: &Client, field_manager: &str) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [ProfilingTarget::crd(), Profile::crd()] {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        crate::wait_for(&crds, &name, WAIT, |c| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await?;
    }
    Ok(())
}

/// The configuration of a test's operator: only targets labelled `RUN_LABEL=run`, a short lease.
pub fn test_config(run: &str) -> OperatorConfig {
    OperatorConfig::from_yaml(&format!(
        "targetSelector: {RUN_LABEL}={run}
resyncInterval: 30s
leaderElection: {{enabled: true, leaseDuration: 6s, renewInterval: 2s}}
agent:
  image: {PAUSE_IMAGE}
  imagePullPolicy: Never
  serviceAccountName: default
  hostNetwork: true
  mountBtf: false
  resources: {{requests: {{cpu: 1m, memory: 8Mi}}}}
"
    ))
    .expect("the test configuration is valid")
}

/// An operator running in-process until stopped (gracefully) or killed (dropped).
pub struct RunningOperator {
    stop: watch::Sender<bool>,
    task: JoinHandle<kprof_operator::Result<()>>,
    metrics: Arc<Metrics>,
}

impl RunningOperator {
    pub fn start(client: &Client, namespace: &str, run: &str, identity: &str) -> Self {
        let op = Operator::new(client.clone(), test_config(run), namespace, identity);
        let metrics = op.metrics.clone();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(op.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            stop,
            task,
            metrics,
        }
    }

    /// SIGTERM: finish in-flight work, release the lease.
    pub async fn stop(self) -> Result<()> {
        self.stop.send_replace(true);
        let task = tokio::time::timeout(WAIT, self.task)
            .await
            .context("operator did not stop")?;
        task.context("operator task")?.context("operator")
    }

    /// SIGKILL: drop everything at once, whatever it was doing.
    pub fn kill(self) {
        self.task.abort();
    }

    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// Target reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.metrics
            .reconciles
            .get_or_create(&ControllerLabels {
                controller: "target".into(),
            })
            .get()
    }
}

/// What an operator test works with: the test bed, the test's run label and its operator
/// namespace.
pub struct OperatorBed {
    pub client: Client,
    /// The test bed's (only, real) node.
    pub node: String,
    /// The value of [`RUN_LABEL`] on this test's targets.
    pub run: String,
    /// Where the test's operators run (agent DaemonSet, Lease).
    pub op_ns: TestNamespace,
    prefix: String,
}

impl OperatorBed {
    /// A new namespace `<prefix>-<suffix>` for the test's own objects.
    pub async fn namespace(&self, suffix: &str) -> Result<TestNamespace> {
        TestNamespace::new(&self.client, &format!("{}-{suffix}", self.prefix)).await
    }

    /// Apply (server-side, forced) the ProfilingTarget `name` with `spec`, labelled as this
    /// test's.
    pub async fn apply_target(
        &self,
        api: &Api<ProfilingTarget>,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<ProfilingTarget> {
        let body = serde_json::json!({
            "apiVersion": "kprof.io/v1alpha1",
            "kind": "ProfilingTarget",
            "metadata": {"name": name, "labels": {RUN_LABEL: self.run}},
            "spec": spec,
        });
        api.patch(
            name,
            &PatchParams::apply("kprof-e2e").force(),
            &Patch::Apply(&body),
        )
        .await
        .with_context(|| format!("applying ProfilingTarget {name}"))
    }

    /// Start an operator of this test (replicas share the lease when `identity` is the same).
    pub fn start(&self, identity: &str) -> RunningOperator {
        RunningOperator::start(&self.client, self.op_ns.name(), &self.run, identity)
    }
}

/// Run an operator test: skip loudly without the test bed (fail under
/// `KPROF_REQUIRE_CLUSTER=1`), otherwise install the CRDs, create the test's operator namespace
/// `<prefix>-op` and run `test` with them. Operator logs follow `RUST_LOG` (e.g.
/// `RUST_LOG=kprof_operator=debug`) and show for failing tests.
pub async fn with_operator_bed(
    prefix: &str,
    test: impl AsyncFnOnce(&OperatorBed) -> Result<()>,
) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(tb) = crate::test_bed().await else {
        return Ok(());
    };
    install_crds(&tb.client, "kprof-e2e").await?;
    let op_ns = TestNamespace::new(&tb.client, &format!("{prefix}-op")).await?;
    let bed = OperatorBed {
        client: tb.client,
        node: tb.node,
        run: random_suffix(),
        op_ns,
        prefix: prefix.to_owned(),
    };
    test(&bed).await
}
