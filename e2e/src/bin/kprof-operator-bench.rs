//! `kprof-operator-bench`: the operator at scale against a real API server (`make bench`); it
//! lives with the test bed because it needs a cluster and shares the e2e set-up.
//!
//! Creates `--targets` ProfilingTargets over `--pods` pod objects bound to `--nodes` made-up
//! node names (Node objects are created, tainted and unschedulable, so nothing else lands there
//! and the pod garbage collector keeps the pods; the pods never run), spread over
//! `--namespaces` namespaces, runs the operator in-process and measures:
//!
//! * time from applying the targets to convergence (every target Running + Ready with the right
//!   matched pods and nodes, and the agent DaemonSet covering every node);
//! * API requests the operator made, per target, by verb and resource (counted by a tower layer
//!   on the operator's client);
//! * time for the agent to follow a pod to a new node at that scale.
//!
//! Needs a cluster (`KUBECONFIG`, e.g. `. e2e/testbed/env.sh`); cleans up unless `--keep`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Node, Pod},
};
use kprof_crds::{Phase, ProfilingTarget};
use kprof_e2e::operator::install_crds;
use kprof_operator::{
    AGENT_NAME, Operator, OperatorConfig, reconcile::daemonset::build::daemonset_nodes,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::watch;

#[derive(Parser)]
#[command(about = "Benchmark the kprof operator against a real API server")]
struct Args {
    #[arg(long, default_value_t = 200)]
    targets: usize,
    #[arg(long, default_value_t = 2000)]
    pods: usize,
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Keep the namespaces and nodes afterwards.
    #[arg(long)]
    keep: bool,
}

// ---------------------------------------------------------------------------------------------
// request counting

/// Requests by `VERB resource[/subresource]`.
#[derive(Clone, Default)]
struct Counts(Arc<Mutex<BTreeMap<String, u64>>>);

impl Counts {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().expect("not poisoned").clone()
    }
    fn total(&self) -> u64 {
        self.0.lock().expect("not poisoned").values().sum()
    }
}

struct CountLayer(Counts);

impl<S> tower::Layer<S> for CountLayer {
    type Service = CountService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountService {
            inner,
            counts: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct CountService<S> {
    inner: S,
    counts: Counts,
}

impl<S, B> tower::Service<http::Request<B>> for CountService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let key = classify(req.method(), req.uri());
        *self
            .counts
            .0
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_default() += 1;
        self.inner.call(req)
    }
}

/// `LIST pods`, `WATCH profilingtargets`, `PATCH profilingtargets/status`, ...
fn classify(method: &http::Method, uri: &http::Uri) -> String {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match segs.first() {
        Some(&"api") => &segs[segs.len().min(2)..],
        Some(&"apis") => &segs[segs.len().min(3)..],
        _ => &segs[..],
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let resource = rest.first().copied().unwrap_or("?");
    let named = rest.len() > 1;
    let sub = rest.get(2).map(|s| format!("/{s}")).unwrap_or_default();
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match (method.as_str(), named, watch) {
        ("GET", _, true) => "WATCH",
        ("GET", false, _) => "LIST",
        ("GET", true, _) => "GET",
        ("POST", ..) => "CREATE",
        ("PUT", ..) => "UPDATE",
        ("PATCH", ..) => "PATCH",
        ("DELETE", ..) => "DELETE",
        (m, ..) => m,
    };
    format!("{verb} {resource}{sub}")
}

// ---------------------------------------------------------------------------------------------

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

struct World {
    run: String,
    namespaces: Vec<String>,
    op_namespace: String,
    nodes: Vec<String>,
}

async fn create_world(client: &Client, args: &Args) -> Result<World> {
    let run = suffix();
    let namespaces: Vec<String> = (0..args.namespaces)
        .map(|i| format!("kprof-bench-{run}-{i}"))
        .collect();
    let op_namespace = format!("kprof-bench-{run}-op");
    let nodes: Vec<String> = (0..args.nodes)
        .map(|i| format!("kprof-bench-{run}-node-{i}"))
        .collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces.iter().chain([&op_namespace]) {
        let body: Namespace = serde_json::from_value(
            json!({"metadata": {"name": ns, "labels": {"kprof.io/bench": run}}}),
        )?;
        ns_api
            .create(&PostParams::default(), &body)
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
    }
    let node_api: Api<Node> = Api::all(client.clone());
    for n in &nodes {
        let body: Node = serde_json::from_value(json!({
            "metadata": {"name": n, "labels": {"kprof.io/bench": run}},
            "spec": {
                "unschedulable": true,
                "taints": [
                    {"key": "kprof.io/bench", "effect": "NoSchedule"},
                    {"key": "kprof.io/bench", "effect": "NoExecute"},
                ],
            },
        }))?;
        node_api
            .create(&PostParams::default(), &body)
            .await
            .with_context(|| format!("creating node {n}"))?;
    }
    Ok(World {
        run,
        namespaces,
        op_namespace,
        nodes,
    })
}

/// Pod `i` lives in namespace `i % namespaces`, on node `i % nodes`, with label
/// `app: svc-<(i / namespaces) % targets_per_ns>`.
async fn create_pods(client: &Client, w: &World, args: &Args) -> Result<()> {
    let per_ns_targets = args.targets.div_ceil(args.namespaces);
    stream::iter(0..args.pods)
        .map(|i| {
            let ns = &w.namespaces[i % w.namespaces.len()];
            let node = &w.nodes[i % w.nodes.len()];
            let app = format!("svc-{}", (i / w.namespaces.len()) % per_ns_targets);
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod-{i}"), "labels": {"app": app}},
                    "spec": {
                        "nodeName": node,
                        "tolerations": [{"operator": "Exists"}],
                        "terminationGracePeriodSeconds": 0,
                        "automountServiceAccountToken": false,
                        "containers": [{"name": "main", "image": "kprof.local/testbed/pause:1", "imagePullPolicy": "Never"}],
                    },
                }))?;
                api.create(&PostParams::default(), &pod).await.with_context(|| format!("creating pod-{i}"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
}

/// Expected (matched pods, nodes) per (namespace, target name), from the same layout.
fn expected(w: &World, args: &Args) -> BTreeMap<(String, String), (u32, BTreeSet<String>)> {
    let per_ns_targets = args.targets.div_ceil(args.namespaces);
    let mut out: BTreeMap<(String, String), (u32, BTreeSet<String>)> = BTreeMap::new();
    for t in 0..args.targets {
        let ns = &w.namespaces[t % w.namespaces.len()];
        out.insert(
            (ns.clone(), format!("svc-{}", t / w.namespaces.len())),
            (0, BTreeSet::new()),
        );
    }
    for i in 0..args.pods {
        let ns = &w.namespaces[i % w.namespaces.len()];
        let key = (
            ns.clone(),
            format!("svc-{}", (i / w.namespaces.len()) % per_ns_targets),
        );
        if let Some(e) = out.get_mut(&key) {
            e.0 += 1;
            e.1.insert(w.nodes[i % w.nodes.len()].clone());
        }
    }
    out
}

async fn apply_targets(client: &Client, w: &World, args: &Args) -> Result<()> {
    stream::iter(0..args.targets)
        .map(|t| {
            let ns = &w.namespaces[t % w.namespaces.len()];
            let name = format!("svc-{}", t / w.namespaces.len());
            let api: Api<ProfilingTarget> = Api::namespaced(client.clone(), ns);
            let body = json!({
                "apiVersion": "kprof.io/v1alpha1", "kind": "ProfilingTarget",
                "metadata": {"name": name, "labels": {"kprof.io/bench": w.run}},
                "spec": {"selector": {"matchLabels": {"app": name}}, "profileTypes": ["cpu", "wall"]},
            });
            async move {
                api.patch(&name, &PatchParams::apply("kprof-bench"), &Patch::Apply(&body)).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
}

/// Targets not yet converged (empty: converged).
async fn unconverged(
    client: &Client,
    w: &World,
    want: &BTreeMap<(String, String), (u32, BTreeSet<String>)>,
) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut seen = 0;
    for ns in &w.namespaces {
        let api: Api<ProfilingTarget> = Api::namespaced(client.clone(), ns);
        for t in api.list(&ListParams::default()).await?.items {
            seen += 1;
            let key = (ns.clone(), t.name_any());
            let st = t.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ok = want.get(&key).is_some_and(|(pods, nodes)| {
                st.phase == Some(Phase::Running)
                    && ready
                    && st.observed_generation == t.metadata.generation
                    && st.matched_pods == *pods
                    && st.nodes.iter().cloned().collect::<BTreeSet<_>>() == *nodes
            });
            if !ok {
                bad.push(format!(
                    "{}/{}: {:?} pods={} nodes={}",
                    key.0,
                    key.1,
                    st.phase,
                    st.matched_pods,
                    st.nodes.len()
                ));
            }
        }
    }
    if seen < want.len() {
        bad.push(format!("{} of {} targets visible", seen, want.len()));
    }
    Ok(bad)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>>>,
{
    let t0 = Instant::now();
    loop {
        match f().await? {
            None => return Ok(t0.elapsed()),
            Some(why) if t0.elapsed() > timeout => {
                bail!("{what}: not done after {timeout:?}: {why}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn cleanup(client: &Client, w: &World) {
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in w.namespaces.iter().chain([&w.op_namespace]) {
        let _ = ns_api.delete(ns, &DeleteParams::background()).await;
    }
    let node_api: Api<Node> = Api::all(client.clone());
    for n in &w.nodes {
        let _ = node_api.delete(n, &DeleteParams::default()).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.namespaces > 0 && args.nodes > 0 && args.targets > 0,
        "counts must be positive"
    );
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let config = kube::Config::infer()
        .await
        .context("no cluster (set KUBECONFIG, e.g. `. e2e/testbed/env.sh`)")?;
    let observer = Client::try_from(config.clone())?;
    let counts = Counts::default();
    let op_client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&CountLayer(counts.clone()))
        .build();

    install_crds(&observer, "kprof-bench").await?;
    let w = create_world(&observer, &args).await?;
    println!(
        "kprof-operator-bench: {} targets, {} pods, {} nodes, {} namespaces (run {})",
        args.targets, args.pods, args.nodes, args.namespaces, w.run
    );
    let res = bench(&observer, &op_client, &counts, &w, &args).await;
    if args.keep {
        println!(
            "kept: namespaces kprof-bench-{}-*, nodes kprof-bench-{}-node-*",
            w.run, w.run
        );
    } else {
        cleanup(&observer, &w).await;
    }
    res
}

async fn bench(
    observer: &Client,
    op_client: &Client,
    counts: &Counts,
    w: &World,
    args: &Args,
) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let t0 = Instant::now();
    create_pods(observer, w, args).await?;
    println!("created {} pods in {:.1?}", args.pods, t0.elapsed());

    let mut cfg = OperatorConfig::from_yaml(
        "agent: {image: kprof.local/testbed/pause:1, imagePullPolicy: Never, serviceAccountName: default, mountBtf: false}",
    )?;
    cfg.target_selector = format!("kprof.io/bench={}", w.run);
    let operator = Operator::new(op_client.clone(), cfg, &w.op_namespace, "kprof-bench");
    let metrics = operator.metrics.clone();
    let health = operator.health.clone();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(operator.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));

    // Start-up: lease, initial lists and watches (with the pods already there).
    let t_start = Instant::now();
    wait_until("operator start-up", timeout, || async {
        Ok((!health.is_leading()).then(|| "not leading with synced caches".to_string()))
    })
    .await?;
    let startup_requests = counts.total();
    println!(
        "operator leading with synced caches after {:.2?} ({startup_requests} requests: lease, initial lists, watches)",
        t_start.elapsed()
    );

    // Converge.
    let before = counts.snapshot();
    let want = expected(w, args);
    let t_apply = Instant::now();
    apply_targets(observer, w, args).await?;
    let applied = t_apply.elapsed();
    let agents: Api<DaemonSet> = Api::namespaced(observer.clone(), &w.op_namespace);
    let all_nodes: BTreeSet<String> = want.values().flat_map(|(_, n)| n.iter().cloned()).collect();
    let converged = wait_until("convergence", timeout, || async {
        let bad = unconverged(observer, w, &want).await?;
        if let Some(first) = bad.first() {
            return Ok(Some(format!("{} unconverged, e.g. {first}", bad.len())));
        }
        let ds = agents.get_opt(AGENT_NAME).await?;
        Ok(match ds {
            Some(ds) if daemonset_nodes(&ds) == all_nodes => None,
            _ => Some("agent DaemonSet does not cover every node yet".into()),
        })
    })
    .await?
        + applied;
    let after = counts.snapshot();
    let mut diff: BTreeMap<String, u64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            diff.insert(k.clone(), d);
        }
    }
    let total: u64 = diff.values().sum();
    println!(
        "converged {} targets in {converged:.2?} (targets applied in {applied:.2?})",
        args.targets
    );
    println!(
        "operator API requests during convergence: {total} = {:.2} per target",
        total as f64 / args.targets as f64
    );
    for (k, v) in &diff {
        println!("    {v:>6}  {k}");
    }
    let reconciles = metrics
        .reconciles
        .get_or_create(&kprof_operator::metrics::ControllerLabels {
            controller: "target".into(),
        })
        .get();
    let errors: u64 = [
        "Conflict",
        "ApiError",
        "ApiUnavailable",
        "Rejected",
        "Forbidden",
        "NotFound",
        "InvalidSpec",
    ]
    .iter()
    .map(|c| {
        metrics
            .errors
            .get_or_create(&kprof_operator::metrics::ErrorLabels {
                controller: "target".into(),
                category: (*c).into(),
            })
            .get()
    })
    .sum();
    println!("target reconciles: {reconciles}, reconcile errors: {errors}");
    ensure!(errors == 0, "{errors} reconcile errors");

    // Steady state: a pod moves to another node; the agent follows.
    let ns0 = &w.namespaces[0];
    let pods: Api<Pod> = Api::namespaced(observer.clone(), ns0);
    let moved = pods.get("pod-0").await?;
    let new_node = format!("kprof-bench-{}-node-extra", w.run);
    let node_api: Api<Node> = Api::all(observer.clone());
    node_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": new_node, "labels": {"kprof.io/bench": w.run}}, "spec": {"unschedulable": true, "taints": [{"key": "kprof.io/bench", "effect": "NoSchedule"}]}}))?,
        )
        .await?;
    let c0 = counts.total();
    let t_move = Instant::now();
    pods.delete(
        "pod-0",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    let mut replacement: Pod = serde_json::from_value(json!({
        "metadata": {"name": "pod-0-moved", "labels": moved.labels()},
        "spec": {"nodeName": new_node, "tolerations": [{"operator": "Exists"}], "containers": [{"name": "main", "image": "kprof.local/testbed/pause:1"}]},
    }))?;
    replacement.metadata.namespace = Some(ns0.clone());
    pods.create(&PostParams::default(), &replacement).await?;
    wait_until("agent follows the pod", timeout, || async {
        let ds = agents.get_opt(AGENT_NAME).await?;
        Ok(
            (!ds.is_some_and(|d| daemonset_nodes(&d).contains(&new_node)))
                .then(|| "not yet".to_string()),
        )
    })
    .await?;
    println!(
        "agent DaemonSet followed a moved pod in {:.2?} (from the delete; {} operator requests)",
        t_move.elapsed(),
        counts.total() - c0
    );
    let _ = node_api.delete(&new_node, &DeleteParams::default()).await;

    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .context("operator did not stop")???;
    println!(
        "operator stopped cleanly; total requests {}",
        counts.total()
    );
    Ok(())
}
