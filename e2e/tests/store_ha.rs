//! High availability and persistence of the profile store (issue #13), with the Helm chart on
//! the real test bed: two operator replicas sharing the chart's default volume (a
//! ReadWriteOnce PVC, both replicas on the one node), Profiles of the demo shop read through
//! the aggregated API `data.kprof.io`; then
//!
//! 1. the leader replica is force-deleted (and the node cordoned, so that its replacement stays
//!    Pending: one replica down for the whole phase): reads keep working for 30 s and deleting a
//!    namespace that has Profiles completes (namespace deletion calls the discovery of every
//!    API, ours included);
//!    Then the process of a replica is SIGKILLed while its pod stays (the endpoint lingers
//!    until the kubelet sees it die): reads are retried at most briefly;
//! 2. `kubectl rollout restart` replaces every operator pod: with the chart's default
//!    persistence every Profile's pprof is still served.
//!
//! The test bed has no pod network for Services (no kube-proxy, no DNS) and a hostNetwork
//! operator cannot run twice on one node (same ports), so the operator pods run on the test
//! bed's bridge (`operator.hostNetwork=false`, the API server at the node IP, which the pod
//! route and the API server's certificate cover). The API server reaches them at their pod IPs
//! (`--enable-aggregator-routing`), and the agents (hostNetwork) upload through a small TCP
//! forwarder in this test on 127.0.0.1 that stands in for the `kprof-store` Service: it
//! passes TLS through to a ready operator pod.
//!
//! Needs the release images `ghcr.io/kprof/kprof-{operator,agent}:VERSION` (e2e/cluster-tests.sh builds
//! them) and installs the release `kprof` in `kprof-system`, as `make demo` does.

use std::{
    io::Write as _,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Namespace, PersistentVolumeClaim, Pod},
};
use kprof_crds::{Profile, labels};
use kprof_e2e::{
    TestNamespace, build_python_image,
    chart::{SHOP_IMAGE, SYSTEM_NS, create_shop, install, kubectl_apply, repo, run, uninstall},
    poll_until, require_cluster,
};
use kprof_store::pprof;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
    client::Body,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const OPERATOR_SELECTOR: &str = "app.kubernetes.io/name=kprof,app.kubernetes.io/component=operator";
const API: &str = "/apis/data.kprof.io/v1alpha1";
/// How long one read may take, retries included, while a replica is down.
const READ_BUDGET: Duration = Duration::from_secs(3);
/// How long reads go on after the kill.
const KILL_WINDOW: Duration = Duration::from_secs(30);
/// The bound for deleting a namespace while one replica is down.
const NS_DELETE_BOUND: Duration = Duration::from_secs(90);

/// Figures for the log even when the test passes (libtest captures `eprintln!`).
fn report(line: &str) {
    let _ = std::io::stderr().write_all(format!("store_ha: {line}\n").as_bytes());
}

fn kubectl(args: &[&str]) -> Result<String> {
    run(kprof_e2e::kubectl().args(args))
}

/// Uncordons the node when dropped (also when the test fails half-way).
struct Cordoned(String);

impl Cordoned {
    fn new(node: &str) -> Result<Self> {
        kubectl(&["cordon", node])?;
        Ok(Self(node.to_string()))
    }
}

impl Drop for Cordoned {
    fn drop(&mut self) {
        if let Err(e) = kubectl(&["uncordon", &self.0]) {
            report(&format!("uncordoning {}: {e:#}", self.0));
        }
    }
}

/// The `kprof-store` Service for the agents on this node: 127.0.0.1:<port> → port 8090 of a
/// ready operator pod (round robin, the next one when a connection is refused). TLS passes
/// through: the agents check the store's own certificate, which names 127.0.0.1.
struct UploadForwarder {
    port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl UploadForwarder {
    async fn start(client: Client) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let backends: Arc<Mutex<Vec<String>>> = Arc::default();
        let pods: Api<Pod> = Api::namespaced(client, SYSTEM_NS);
        let refresh = {
            let backends = backends.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(list) = pods
                        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
                        .await
                    {
                        *backends.lock().unwrap() = list
                            .items
                            .iter()
                            .filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
                            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                            .collect();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        let accept = tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            while let Ok((mut down, _)) = listener.accept().await {
                let ips = backends.lock().unwrap().clone();
                let first = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    for i in 0..ips.len() {
                        let ip = &ips[(first + i) % ips.len()];
                        let connect = TcpStream::connect((ip.as_str(), 8090));
                        if let Ok(Ok(mut up)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            tasks: vec![refresh, accept],
        })
    }
}

impl Drop for UploadForwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn operator_pods(client: &Client) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    Ok(pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items)
}

/// One GET of a Profile's pprof through the API server: (status, body).
async fn get_pprof(client: &Client, ns: &str, name: &str) -> Result<(u16, Vec<u8>)> {
    let req = http::Request::get(format!("{API}/namespaces/{ns}/profiles/{name}/pprof"))
        .body(Body::empty())?;
    let fut = async {
        let resp = client.send(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect_bytes().await?;
        anyhow::Ok((status, body.to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("no answer within 5 s")?
}

/// Checks what a read returned against the Profile: the gzip pprof of its size, decodable.
fn check_pprof(profile: &Profile, status: u16, body: &[u8]) -> Result<()> {
    let name = profile.metadata.name.as_deref().unwrap_or("?");
    ensure!(
        status == 200,
        "pprof of {name}: HTTP {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    ensure!(
        body.starts_with(&[0x1f, 0x8b]),
        "pprof of {name} is not gzip ({} bytes)",
        body.len()
    );
    if let Some(a) = &profile.spec.artifacts.pprof
        && a.size_bytes > 0
    {
        ensure!(
            body.len() as u64 == a.size_bytes,
            "pprof of {name}: {} bytes, the Profile says {}",
            body.len(),
            a.size_bytes
        );
    }
    let decoded = pprof::Profile::decode_bytes(body)
        .with_context(|| format!("decoding the pprof of {name}"))?;
    ensure!(!decoded.sample.is_empty(), "pprof of {name} has no samples");
    Ok(())
}

/// A read that may be retried within `budget`: (attempts, time to a good answer).
async fn read_until_ok(
    client: &Client,
    profile: &Profile,
    budget: Duration,
) -> Result<(u32, Duration)> {
    let ns = profile.metadata.namespace.as_deref().unwrap_or_default();
    let name = profile.metadata.name.as_deref().unwrap_or_default();
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match get_pprof(client, ns, name).await {
            Ok((status, body)) => match check_pprof(profile, status, &body) {
                Ok(()) => return Ok((attempts, start.elapsed())),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if start.elapsed() >= budget {
            return Err(err.context(format!(
                "reading {ns}/{name}: {attempts} attempts in {:?}",
                start.elapsed()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads done while a replica was away.
struct Reads {
    count: u32,
    retried: u32,
    extra_attempts: u32,
    /// Sorted.
    latencies: Vec<Duration>,
}

impl std::fmt::Display for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reads, all served; {} needed a retry ({} extra attempts); latency p50 {:?}, p99 {:?}, max {:?}",
            self.count,
            self.retried,
            self.extra_attempts,
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.latencies.last().copied().unwrap_or_default()
        )
    }
}

/// Reads `profiles` round robin until `window` after `since` (`after` names the event), each
/// within [`READ_BUDGET`]: one that fails for good fails the test.
async fn read_for(
    client: &Client,
    profiles: &[Profile],
    since: Instant,
    window: Duration,
    after: &str,
) -> Result<Reads> {
    let mut r = Reads {
        count: 0,
        retried: 0,
        extra_attempts: 0,
        latencies: Vec::new(),
    };
    while since.elapsed() < window {
        let p = &profiles[r.count as usize % profiles.len()];
        let (attempts, took) = read_until_ok(client, p, READ_BUDGET)
            .await
            .with_context(|| {
                format!(
                    "read {} at {:?} after {after}",
                    r.count + 1,
                    since.elapsed()
                )
            })?;
        r.count += 1;
        if attempts > 1 {
            r.retried += 1;
            r.extra_attempts += attempts - 1;
        }
        r.latencies.push(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.latencies.sort();
    Ok(r)
}

/// The shop and a cpu ProfilingTarget for it in `ns` (retention high enough that no Profile
/// is deleted while the test runs).
async fn start_shop(ns: &TestNamespace) -> Result<()> {
    create_shop(ns).await?;
    let target = format!(
        "apiVersion: kprof.io/v1alpha1\nkind: ProfilingTarget\nmetadata: {{name: shop, namespace: {}}}\n\
         spec: {{selector: {{matchLabels: {{app: shop}}}}, profileTypes: [cpu], sampleHz: 99, window: 5s, retention: {{maxProfiles: 500}}}}\n",
        ns.name()
    );
    let out = kubectl_apply(&target)?;
    ensure!(
        out.status.success(),
        "target refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The shop's Profiles in `ns` that have a pprof artifact, oldest first.
async fn profiles_with_pprof(profiles: &Api<Profile>) -> Result<Vec<Profile>> {
    let lp = ListParams::default().labels(&format!("{}=shop", labels::TARGET));
    let mut list: Vec<Profile> = profiles
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.artifacts.pprof.is_some() && p.spec.samples > 0)
        .collect();
    list.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
    });
    Ok(list)
}

async fn wait_profiles(profiles: &Api<Profile>, n: usize, what: &str) -> Result<Vec<Profile>> {
    poll_until(
        what,
        Duration::from_secs(180),
        Duration::from_secs(2),
        || {
            let profiles = profiles.clone();
            async move {
                let list = profiles_with_pprof(&profiles).await?;
                Ok((list.len() >= n).then_some(list))
            }
        },
    )
    .await
}

/// The host pid of the `kprof-operator run` process in the pod with this UID (found by its
/// cgroup path, `.../pod<uid>/...`).
fn operator_pid(pod_uid: &str) -> Result<u32> {
    let needle = format!("pod{pod_uid}");
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_operator = args.first().is_some_and(|a| a.ends_with(b"kprof-operator"))
            && args.get(1) == Some(&&b"run"[..]);
        if is_operator
            && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap_or_default()
                .contains(&needle)
        {
            return Ok(pid);
        }
    }
    bail!("no kprof-operator process in a cgroup of pod {pod_uid}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_survive_a_kill_and_a_restart_keeps_artifacts() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let client = tb.client.clone();
    build_python_image(SHOP_IMAGE, &repo().join("e2e/demo/shop"), None)?;
    // The default StorageClass and volumes the chart's PVC needs (up.sh makes them too; this
    // also recycles volumes released since).
    kprof_e2e::run_testbed_script("storage.sh", &[])?;

    // --- install: two replicas, the chart's default persistence ----------------------------
    let forwarder = UploadForwarder::start(client.clone()).await?;
    let values = std::env::temp_dir().join(format!("store-ha-values-{}.yaml", std::process::id()));
    std::fs::write(
        &values,
        format!(
            "operator:\n  hostNetwork: false\n  env:\n    - {{name: KPROF_LOG, value: info}}\n    \
             - {{name: KUBERNETES_SERVICE_HOST, value: \"{ip}\"}}\n    \
             - {{name: KUBERNETES_SERVICE_PORT, value: \"{port}\"}}\n\
             agent:\n  storeUrl: https://127.0.0.1:{fwd}\n",
            ip = tb.node_ip,
            port = tb.apiserver_port,
            fwd = forwarder.port,
        ),
    )?;
    let values_arg = values.display().to_string();
    let install = |extra: &[&str]| {
        let mut args = vec!["-f", &values_arg, "--set", "operator.replicas=2"];
        args.extend_from_slice(extra);
        install(&args)
    };
    install(&[])?;

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), SYSTEM_NS);
    let pvc = pvcs.get("kprof-store").await.context("the chart's PVC")?;
    let phase = pvc.status.and_then(|s| s.phase).unwrap_or_default();
    ensure!(phase == "Bound", "PVC kprof-store is {phase}");
    let pods = operator_pods(&client).await?;
    let ready: Vec<&Pod> = pods.iter().filter(|p| pod_ready(p)).collect();
    ensure!(
        ready.len() == 2,
        "{} operator pods ready, want 2",
        ready.len()
    );
    for p in &ready {
        let spec = p.spec.as_ref().context("pod spec")?;
        ensure!(
            spec.volumes.iter().flatten().any(|v| v
                .persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == "kprof-store")),
            "operator pod {:?} does not mount the PVC",
            p.metadata.name
        );
    }
    report(&format!(
        "2 operator replicas ready at {:?}, PVC kprof-store Bound to {}",
        ready
            .iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect::<Vec<_>>(),
        pvc.spec.and_then(|s| s.volume_name).unwrap_or_default()
    ));

    // --- Profiles in two namespaces ---------------------------------------------------------
    let ns_a = TestNamespace::new(&client, "store-ha").await?;
    let ns_b = TestNamespace::new(&client, "store-ha-deleted").await?;
    start_shop(&ns_a).await?;
    start_shop(&ns_b).await?;
    let profiles_a: Api<Profile> = ns_a.api();
    let profiles_b: Api<Profile> = ns_b.api();
    let before = wait_profiles(&profiles_a, 2, "2 Profiles with a pprof in namespace A").await?;
    wait_profiles(&profiles_b, 1, "a Profile with a pprof in namespace B").await?;
    for p in &before {
        read_until_ok(&client, p, Duration::from_secs(10)).await?;
    }
    report(&format!(
        "{} Profiles of namespace {} read through the API server before the kill",
        before.len(),
        ns_a.name()
    ));

    // --- one replica down: reads and a namespace deletion ----------------------------------
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
    let leader = leases
        .get("kprof-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .context("the leader Lease has no holder")?;
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    let cordon = Cordoned::new(&tb.node)?;
    let killed_at = Instant::now();
    pods_api
        .delete(
            &leader,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .with_context(|| format!("force-deleting the leader {leader}"))?;
    report(&format!(
        "force-deleted the leader replica {leader}; node cordoned so its replacement stays Pending"
    ));

    // Delete namespace B (it has Profiles) right away, and time it.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns_b_name = ns_b.name().to_string();
    let deletion = {
        let namespaces = namespaces.clone();
        let name = ns_b_name.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            namespaces.delete(&name, &DeleteParams::default()).await?;
            let mut discovery_failures = 0u32;
            loop {
                match namespaces.get_opt(&name).await? {
                    None => return anyhow::Ok((start.elapsed(), discovery_failures)),
                    Some(ns) => {
                        if ns
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| {
                                c.type_ == "NamespaceDeletionDiscoveryFailure" && c.status == "True"
                            })
                        {
                            discovery_failures += 1;
                        }
                    }
                }
                if start.elapsed() > NS_DELETE_BOUND {
                    bail!(
                        "namespace {name} still there {NS_DELETE_BOUND:?} after its deletion \
                         (discovery failure seen {discovery_failures} times)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // Reads for KILL_WINDOW, round robin over A's Profiles.
    let reads = read_for(&client, &before, killed_at, KILL_WINDOW, "the kill").await?;
    let (ns_took, discovery_failures) = deletion.await??;
    let serving = operator_pods(&client)
        .await?
        .iter()
        .filter(|p| pod_ready(p))
        .count();
    ensure!(
        serving == 1,
        "{serving} operator replicas ready during the kill phase, want exactly 1"
    );
    report(&format!(
        "one replica down for {:?}: {reads}",
        killed_at.elapsed()
    ));
    report(&format!(
        "namespace {ns_b_name} (with Profiles) deleted in {ns_took:?} with one replica down \
         (NamespaceDeletionDiscoveryFailure seen in {discovery_failures} polls)"
    ));
    ensure!(
        profiles_b
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "Profiles left in the deleted namespace"
    );
    drop(ns_b);

    // The leader's Lease moved to the surviving replica (reconciling goes on).
    let new_leader = poll_until(
        "a new leader",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || {
            let leases = leases.clone();
            let leader = leader.clone();
            async move {
                let holder = leases
                    .get("kprof-operator")
                    .await?
                    .spec
                    .and_then(|s| s.holder_identity);
                Ok(holder.filter(|h| *h != leader))
            }
        },
    )
    .await?;
    report(&format!("leader Lease now held by {new_leader}"));

    drop(cordon);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SYSTEM_NS);
    let two_ready = || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("kprof-operator").await?;
            let s = d.status.unwrap_or_default();
            Ok((s.ready_replicas == Some(2)
                && s.updated_replicas == Some(2)
                && s.replicas == Some(2))
            .then_some(()))
        }
    };
    poll_until(
        "2 ready operator replicas after uncordoning",
        Duration::from_secs(120),
        Duration::from_secs(1),
        two_ready,
    )
    .await?;

    // --- a replica's process killed (its pod stays): reads retried at most briefly -------------
    // Unlike a deleted pod, the endpoint stays until the kubelet sees the container die, so
    // the API server may still route a read to it.
    let victim = operator_pods(&client)
        .await?
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(new_leader.as_str()))
        .context("the leader's pod")?;
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum::<i32>())
    };
    let restarts_before = restarts(&victim);
    let pid = operator_pid(victim.metadata.uid.as_deref().unwrap_or_default())?;
    run(Command::new("kill").args(["-KILL", &pid.to_string()]))?;
    let sigkill_at = Instant::now();
    report(&format!(
        "SIGKILLed the operator process {pid} of {new_leader} (its pod stays; the kubelet restarts it)"
    ));
    let reads = read_for(
        &client,
        &before,
        sigkill_at,
        Duration::from_secs(20),
        "the SIGKILL",
    )
    .await?;
    report(&format!(
        "process killed: {reads} in {:?}",
        sigkill_at.elapsed()
    ));
    poll_until(
        "the killed replica restarted and 2 replicas ready",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || {
            let client = client.clone();
            let name = new_leader.clone();
            async move {
                let pods = operator_pods(&client).await?;
                let restarted = pods.iter().any(|p| {
                    p.metadata.name.as_deref() == Some(name.as_str())
                        && restarts(p) > restarts_before
                });
                let ready = pods.iter().filter(|p| pod_ready(p)).count();
                Ok((restarted && ready == 2).then_some(()))
            }
        },
    )
    .await?;

    // --- restart every operator pod: the artifacts are still served -------------------------
    let old: Vec<String> = operator_pods(&client)
        .await?
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    let before_restart = profiles_with_pprof(&profiles_a).await?;
    let restart_at = Instant::now();
    kubectl(&[
        "-n",
        SYSTEM_NS,
        "rollout",
        "restart",
        "deployment/kprof-operator",
    ])?;
    kubectl(&[
        "-n",
        SYSTEM_NS,
        "rollout",
        "status",
        "deployment/kprof-operator",
        "--timeout=180s",
    ])?;
    poll_until(
        "only new operator pods, 2 ready",
        Duration::from_secs(120),
        Duration::from_secs(1),
        || {
            let client = client.clone();
            let old = old.clone();
            async move {
                let pods = operator_pods(&client).await?;
                let all_new = pods
                    .iter()
                    .all(|p| !old.contains(p.metadata.uid.as_ref().unwrap()));
                let ready = pods.iter().filter(|p| pod_ready(p)).count();
                Ok((all_new && ready == 2 && pods.len() == 2).then_some(()))
            }
        },
    )
    .await?;
    report(&format!(
        "rollout restart: 2 new operator pods ready after {:?}",
        restart_at.elapsed()
    ));

    let after = profiles_with_pprof(&profiles_a).await?;
    let survivors: Vec<&Profile> = before_restart
        .iter()
        .filter(|p| after.iter().any(|q| q.metadata.name == p.metadata.name))
        .collect();
    ensure!(
        survivors.len() >= 2,
        "only {} of the {} Profiles from before the restart are left",
        survivors.len(),
        before_restart.len()
    );
    let mut restart_latencies = Vec::new();
    let mut bytes = 0usize;
    for p in &after {
        let (_, took) = read_until_ok(&client, p, Duration::from_secs(10)).await?;
        restart_latencies.push(took);
        bytes += p
            .spec
            .artifacts
            .pprof
            .as_ref()
            .map_or(0, |a| a.size_bytes as usize);
    }
    restart_latencies.sort();
    report(&format!(
        "after the restart: every one of the {} Profiles served its pprof ({} of them from \
         before the restart, {bytes} bytes in all; max read {:?})",
        after.len(),
        survivors.len(),
        restart_latencies.last().copied().unwrap_or_default()
    ));

    // --- clean up --------------------------------------------------------------------------
    uninstall()?;
    let _ = std::fs::remove_file(&values);
    poll_until(
        "no operator pod left",
        Duration::from_secs(90),
        Duration::from_secs(2),
        || {
            let client = client.clone();
            async move { Ok(operator_pods(&client).await?.is_empty().then_some(())) }
        },
    )
    .await?;
    // The PVC stays (helm.sh/resource-policy: keep) for the next install of the release.
    ensure!(
        pvcs.get_opt("kprof-store").await?.is_some(),
        "helm uninstall deleted the kept PVC"
    );
    drop(forwarder);
    Ok(())
}
