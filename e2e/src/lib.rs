//! Helpers for kprof tests that need a real Kubernetes cluster: the single-node test bed that
//! `e2e/testbed/up.sh` (`make cluster-up`) starts on this machine. See `e2e/README.md`.
//!
//! ```no_run
//! use kprof_e2e::{require_cluster, TestNamespace};
//! # async fn doc() -> anyhow::Result<()> {
//! let tb = require_cluster!(Ok(())); // skips loudly (or fails under KPROF_REQUIRE_CLUSTER=1)
//! let ns = TestNamespace::new(&tb.client, "my-test").await?; // deleted on drop, dumped on panic
//! # Ok(()) }
//! ```
//!
//! Pods in the test bed should use `hostNetwork: true` (there is no kube-proxy and no pod
//! network), `imagePullPolicy: Never` with an image imported by `e2e/testbed/image.sh` or
//! `python-image.sh`, and, when they talk to the API server, [`TestBed::in_cluster_env`]
//! (the default `KUBERNETES_SERVICE_HOST` is a ClusterIP, which is routed nowhere here).

pub mod agent;
pub mod chart;
pub mod operator;
pub mod registry;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{EnvVar, Event, Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;

/// Set to `1` (as `make test` does) to turn "no cluster" into a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "KPROF_REQUIRE_CLUSTER";
/// Set to `1` to keep a test's namespace after the test (for debugging).
pub const KEEP_NAMESPACE_ENV: &str = "KPROF_E2E_KEEP_NAMESPACE";
/// Default state directory of the test bed (`$KPROF_STATE`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kprof-testbed";
/// Default cache directory (`$KPROF_CACHE`), holding the built Kubernetes binaries.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kprof";
/// A Python 3.11 image `up.sh` imports into the test bed (interpreter + stdlib, no app;
/// use `command: ["python3", "-c", ...]`).
pub const TEST_PYTHON_IMAGE: &str = "kprof.local/testbed/python:1";
/// Label put on every namespace made by [`TestNamespace`].
pub const NAMESPACE_LABEL: &str = "kprof.io/e2e";

const ENV_SH: &str = include_str!("../testbed/env.sh");

/// Kubernetes version the test bed is built for (parsed from `testbed/env.sh`, overridable
/// with `$K8S_VERSION` like the scripts).
pub fn k8s_version() -> String {
    if let Ok(v) = std::env::var("K8S_VERSION") {
        return v.trim_start_matches('v').to_string();
    }
    ENV_SH
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("export K8S_VERSION=\"${K8S_VERSION:-")
        })
        .and_then(|rest| rest.split('}').next())
        .expect("testbed/env.sh defines K8S_VERSION")
        .to_string()
}

/// `$KPROF_STATE` or [`DEFAULT_STATE_DIR`].
pub fn state_dir() -> PathBuf {
    env_path("KPROF_STATE").unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Directory with the version-matched `kubectl`, `helm` and Kubernetes binaries.
pub fn k8s_bin_dir() -> PathBuf {
    if let Some(p) = env_path("KPROF_K8S_BIN") {
        return p;
    }
    let cache = env_path("KPROF_CACHE").unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
    cache
        .join("k8s")
        .join(format!("v{}", k8s_version()))
        .join("bin")
}

/// The test bed's scripts (`up.sh`, `image.sh`, ...).
pub fn testbed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed")
}

/// The kubeconfig tests use: the first entry of `$KUBECONFIG`, else `<state>/kubeconfig`.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
        .unwrap_or_else(|| state_dir().join("kubeconfig"))
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A kube [`Client`] for the test bed's kubeconfig.
pub async fn client() -> Result<Client> {
    client_from(&kubeconfig_path()).await
}

async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    Client::try_from(cfg).context("building the kube client")
}

/// `kubectl` (the version-matched build when present) with the test bed's kubeconfig.
pub fn kubectl() -> Command {
    let built = k8s_bin_dir().join("kubectl");
    let mut cmd = Command::new(if built.exists() {
        built
    } else {
        PathBuf::from("kubectl")
    });
    cmd.env("KUBECONFIG", kubeconfig_path());
    cmd
}

/// Why the test bed cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(pub String);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `None` when the test bed is usable (kubeconfig present, API server answering, a node
/// Ready), else the reason it is not.
pub async fn cluster_available() -> Option<Reason> {
    connect().await.err().map(|e| Reason(format!("{e:#}")))
}

/// Whether `KPROF_REQUIRE_CLUSTER` asks for a missing cluster to fail tests.
pub fn cluster_required() -> bool {
    matches!(
        std::env::var(REQUIRE_ENV).as_deref(),
        Ok("1" | "true" | "yes")
    )
}

/// A connected test bed.
#[derive(Clone)]
pub struct TestBed {
    pub client: Client,
    /// Name of the (single) node.
    pub node: String,
    /// The node's InternalIP: also the pod IP of every `hostNetwork` pod.
    pub node_ip: String,
    /// The API server's port on 127.0.0.1.
    pub apiserver_port: u16,
}

impl TestBed {
    /// Env vars that make an in-cluster client in a `hostNetwork` pod reach the API server
    /// (the kubelet's defaults point at the ClusterIP, which nothing implements here).
    pub fn in_cluster_env(&self) -> Vec<EnvVar> {
        [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", self.apiserver_port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| EnvVar {
            name: k.into(),
            value: Some(v),
            ..Default::default()
        })
        .collect()
    }
}

async fn connect() -> Result<TestBed> {
    let path = kubeconfig_path();
    if !path.exists() {
        bail!(
            "no kubeconfig at {} (start the test bed: `make cluster-up` or e2e/testbed/up.sh)",
            path.display()
        );
    }
    let client = client_from(&path).await?;
    let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
        .await
        .map_err(|_| anyhow!("API server of {} did not answer within 10s", path.display()))?
        .with_context(|| format!("API server of {} not reachable", path.display()))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .context("listing nodes")?;
    let ready = list
        .items
        .iter()
        .find(|n| node_is_ready(n))
        .ok_or_else(|| {
            anyhow!(
                "API server v{}.{} is up but no node is Ready ({} node(s))",
                version.major,
                version.minor,
                list.items.len()
            )
        })?;
    let node_ip = ready
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .map(|a| a.address.clone())
        .unwrap_or_default();
    let apiserver_port = Kubeconfig::read_from(&path)
        .ok()
        .and_then(|kc| kc.clusters.into_iter().next())
        .and_then(|c| c.cluster?.server)
        .and_then(|s| s.rsplit(':').next()?.trim_end_matches('/').parse().ok())
        .unwrap_or(6443);
    Ok(TestBed {
        client,
        node: ready.metadata.name.clone().unwrap_or_default(),
        node_ip,
        apiserver_port,
    })
}

/// Connect to the test bed, or — when it is not usable — print
/// `SKIPPED: needs the test bed: <reason>` to stderr and return `None`; under
/// `KPROF_REQUIRE_CLUSTER=1` it panics instead (a missing cluster is then a failure).
/// Prefer the [`require_cluster!`] macro.
pub async fn test_bed() -> Option<TestBed> {
    match connect().await {
        Ok(tb) => Some(tb),
        Err(e) => {
            let test = std::thread::current().name().unwrap_or("?").to_string();
            if cluster_required() {
                panic!("{REQUIRE_ENV}=1 but the test bed is not usable: {e:#} (test {test})");
            }
            // Straight to fd 2: libtest captures eprintln! of passing tests, and a skip must
            // be visible in a plain `cargo test` run.
            let msg = format!(
                "SKIPPED: needs the test bed: {e:#} (test {test}; set {REQUIRE_ENV}=1 to fail instead)\n"
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
            None
        }
    }
}

/// `let tb = require_cluster!();` in an async test: a [`TestBed`], or skip loudly (return)
/// when there is no cluster, or fail under `KPROF_REQUIRE_CLUSTER=1`.
/// In tests returning `Result`, use `require_cluster!(Ok(()))`.
#[macro_export]
macro_rules! require_cluster {
    () => {
        match $crate::test_bed().await {
            Some(tb) => tb,
            None => return,
        }
    };
    ($ret:expr) => {
        match $crate::test_bed().await {
            Some(tb) => tb,
            None => return $ret,
        }
    };
}

/// Is the node's Ready condition True?
pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A short random lowercase suffix for resource names.
pub fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut x = std::collections::hash_map::RandomState::new().hash_one((
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    ));
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..6)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// A namespace for one test, `<prefix>-<random>`; deleted when dropped (unless
/// `KPROF_E2E_KEEP_NAMESPACE=1`). If the test panics while it is alive, the pods, events and
/// container logs of the namespace are dumped to stderr first.
pub struct TestNamespace {
    name: String,
    client: Client,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Result<Self> {
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("{}-{}", prefix.trim_matches('-'), random_suffix());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some(BTreeMap::from([(
            NAMESPACE_LABEL.to_string(),
            "true".to_string(),
        )]));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        // The controller manager creates the default ServiceAccount shortly after; pods that
        // mount a token are refused until it exists.
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        poll_until(
            &format!("ServiceAccount {name}/default"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
            },
        )
        .await?;
        Ok(Self {
            name,
            client: client.clone(),
            kubeconfig: kubeconfig_path(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A namespaced API handle in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Pods, events and logs of this namespace, as text.
    pub async fn dump(&self) -> String {
        dump_namespace(&self.client, &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let keep = matches!(
            std::env::var(KEEP_NAMESPACE_ENV).as_deref(),
            Ok("1" | "true")
        );
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        // Drop cannot await, and the test's runtime may be single-threaded and blocked right
        // here: do the work on a separate thread with its own runtime and client.
        let worker = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return eprintln!("kprof-e2e: cannot clean up namespace {name}: {e}"),
            };
            rt.block_on(async move {
                let client = match client_from(&kubeconfig).await {
                    Ok(c) => c,
                    Err(e) => {
                        return eprintln!("kprof-e2e: cannot clean up namespace {name}: {e:#}");
                    }
                };
                if panicking {
                    eprintln!("{}", dump_namespace(&client, &name).await);
                }
                if keep {
                    eprintln!("kprof-e2e: keeping namespace {name} ({KEEP_NAMESPACE_ENV}=1)");
                    return;
                }
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::background()
                };
                let namespaces = Api::<Namespace>::all(client);
                let fut = namespaces.delete(&name, &dp);
                match tokio::time::timeout(Duration::from_secs(15), fut).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("kprof-e2e: deleting namespace {name}: {e}"),
                    Err(_) => eprintln!("kprof-e2e: deleting namespace {name}: timed out"),
                }
            });
        });
        let _ = worker.join();
    }
}

/// A human-readable dump of a namespace for failure diagnostics: every pod's phase,
/// conditions and container states, the namespace's events (oldest first) and the last 200
/// lines of every container's log (and of its previous instance if it restarted).
pub async fn dump_namespace(client: &Client, ns: &str) -> String {
    use std::fmt::Write;
    let mut out = format!("===== kprof-e2e: dump of namespace {ns} =====\n");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pods.list(&ListParams::default()).await {
        Err(e) => writeln!(out, "listing pods: {e}").unwrap(),
        Ok(list) => {
            for p in &list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                let st = p.status.clone().unwrap_or_default();
                writeln!(
                    out,
                    "--- pod {name}: phase={} node={} podIP={} reason={} message={}",
                    st.phase.unwrap_or_default(),
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                    st.pod_ip.unwrap_or_default(),
                    st.reason.unwrap_or_default(),
                    st.message.unwrap_or_default()
                )
                .unwrap();
                for c in st.conditions.unwrap_or_default() {
                    writeln!(
                        out,
                        "    condition {}={} {} {}",
                        c.type_,
                        c.status,
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    )
                    .unwrap();
                }
                let statuses = st
                    .init_container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .chain(st.container_statuses.unwrap_or_default());
                for cs in statuses {
                    let state = serde_json::to_string(&cs.state).unwrap_or_default();
                    writeln!(
                        out,
                        "    container {} ready={} restarts={} image={} state={state}",
                        cs.name, cs.ready, cs.restart_count, cs.image
                    )
                    .unwrap();
                    for previous in [false, true] {
                        if previous && cs.restart_count == 0 {
                            continue;
                        }
                        let lp = LogParams {
                            container: Some(cs.name.clone()),
                            previous,
                            tail_lines: Some(200),
                            ..Default::default()
                        };
                        match pods.logs(&name, &lp).await {
                            Ok(log) => {
                                writeln!(
                                    out,
                                    "    ---- logs of {name}/{}{} ----",
                                    cs.name,
                                    if previous { " (previous)" } else { "" }
                                )
                                .unwrap();
                                for line in log.lines() {
                                    writeln!(out, "    | {line}").unwrap();
                                }
                            }
                            Err(e) => {
                                writeln!(out, "    (no logs for {name}/{}: {e})", cs.name).unwrap()
                            }
                        }
                    }
                }
            }
            if list.items.is_empty() {
                writeln!(out, "(no pods)").unwrap();
            }
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    match events.list(&ListParams::default()).await {
        Err(e) => writeln!(out, "listing events: {e}").unwrap(),
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| {
                e.last_timestamp
                    .clone()
                    .or(e.first_timestamp.clone())
                    .map(|t| t.0)
            });
            writeln!(out, "--- events").unwrap();
            for e in items {
                writeln!(
                    out,
                    "    {} {} {}/{}: {} x{}",
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                    e.count.unwrap_or(1)
                )
                .unwrap();
            }
        }
    }
    out.push_str("===== end of dump =====");
    out
}

/// Poll `f` every `interval` until it yields `Some`, failing after `timeout` (the last
/// error, if any, is part of the message).
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// Watch the object `name` until `cond` holds (or `timeout` passes); returns the object.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    cond: impl Fn(Option<&K>) -> bool,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
    <K as Resource>::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => bail!("{kind} {name} does not exist"),
        Ok(Err(e)) => Err(anyhow!(e).context(format!("watching {kind} {name}"))),
        Err(_) => bail!("timed out after {timeout:?} waiting for {kind} {name}"),
    }
}

/// Container waiting reasons that will not resolve by themselves.
const FATAL_WAITING: &[&str] = &[
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
];

fn pod_problem(p: &Pod) -> Option<String> {
    let st = p.status.as_ref()?;
    if st.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "pod failed: {} {}",
            st.reason.clone().unwrap_or_default(),
            st.message.clone().unwrap_or_default()
        ));
    }
    st.container_statuses.iter().flatten().find_map(|cs| {
        let w = cs.state.as_ref()?.waiting.as_ref()?;
        let r = w.reason.as_deref()?;
        FATAL_WAITING.contains(&r).then(|| {
            format!(
                "container {}: {r}: {}",
                cs.name,
                w.message.clone().unwrap_or_default()
            )
        })
    })
}

fn pod_phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Wait until the pod is Running with all containers ready; fails fast on image/crash errors.
pub async fn wait_pod_running(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    let ready = |p: &Pod| {
        pod_phase(p) == "Running"
            && p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| cs.iter().all(|c| c.ready))
    };
    let pod = wait_for(api, name, timeout, |p| {
        p.is_some_and(|p| ready(p) || pod_problem(p).is_some() || pod_phase(p) == "Succeeded")
    })
    .await?;
    if let Some(problem) = pod_problem(&pod) {
        bail!("pod {name} will not run: {problem}");
    }
    if !ready(&pod) {
        bail!("pod {name} is {} instead of Running", pod_phase(&pod));
    }
    Ok(pod)
}

/// Wait until the pod has completed successfully; fails fast on failure or image errors.
pub async fn wait_pod_succeeded(api: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    let pod = wait_for(api, name, timeout, |p| {
        p.is_some_and(|p| pod_phase(p) == "Succeeded" || pod_problem(p).is_some())
    })
    .await?;
    if let Some(problem) = pod_problem(&pod) {
        bail!("pod {name} did not succeed: {problem}");
    }
    Ok(pod)
}

/// All logs of a pod's (first or named) container.
pub async fn pod_logs(api: &Api<Pod>, name: &str, container: Option<&str>) -> Result<String> {
    let lp = LogParams {
        container: container.map(str::to_string),
        ..Default::default()
    };
    api.logs(name, &lp)
        .await
        .with_context(|| format!("logs of pod {name}"))
}

/// A bound token of ServiceAccount `ns/sa` (created when missing) from a TokenRequest, valid
/// for `seconds` (the API server's minimum is 600): what a pod would find in its projected
/// token file, for processes running on the host.
pub async fn service_account_token(
    client: &Client,
    ns: &str,
    sa: &str,
    seconds: i64,
) -> Result<String> {
    service_account_token_for(client, ns, sa, seconds, None).await
}

/// [`service_account_token`] meant for `audiences` (none: the API server's).
pub async fn service_account_token_for(
    client: &Client,
    ns: &str,
    sa: &str,
    seconds: i64,
    audiences: Option<Vec<String>>,
) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    if api.get_opt(sa).await?.is_none() {
        let mut obj = ServiceAccount::default();
        obj.metadata.name = Some(sa.into());
        api.create(&PostParams::default(), &obj).await?;
    }
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(seconds),
            audiences: audiences.unwrap_or_default(),
            ..Default::default()
        },
        ..Default::default()
    };
    let tr = api
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .with_context(|| format!("token for {ns}/{sa}"))?;
    Ok(tr.status.context("no token status")?.token)
}

/// `GET path` on `addr` (`host:port`, plain HTTP/1.1, `Connection: close`): the status and the
/// body bytes. Async, so that it can read from a server running on the test's own runtime.
pub async fn http_get_bytes(addr: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        anyhow::Ok(resp)
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| anyhow!("GET {addr}{path}: no answer within 10s"))?
        .with_context(|| format!("GET {addr}{path}"))?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no end of headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    // Bodies are taken as they come: a chunked answer would need decoding.
    if head.contains("transfer-encoding: chunked") {
        bail!("GET {addr}{path}: chunked answers are not supported here");
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {addr}{path}: no status line"))?;
    Ok((status, resp[split + 4..].to_vec()))
}

/// A TCP port that is currently free on every local address (for `hostNetwork` servers).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind(("0.0.0.0", 0))?
        .local_addr()?
        .port())
}

/// Run a test bed script (e.g. `image.sh`) with arguments; fails with its output.
pub fn run_testbed_script(script: &str, args: &[&str]) -> Result<String> {
    let path = testbed_dir().join(script);
    let out = Command::new(&path)
        .args(args)
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{text}",
            path.display(),
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}

/// Build an image from binaries (`image.sh NAME:TAG BIN...`) and import it into the test bed.
pub fn build_image(name_tag: &str, binaries: &[&Path]) -> Result<()> {
    let mut args = vec![name_tag.to_string()];
    args.extend(binaries.iter().map(|b| b.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_testbed_script("image.sh", &args).map(|_| ())
}

/// Build a Python image from an app directory (`python-image.sh NAME:TAG DIR [SCRIPT]`).
pub fn build_python_image(name_tag: &str, app_dir: &Path, script: Option<&str>) -> Result<()> {
    let dir = app_dir.display().to_string();
    let mut args = vec![name_tag, dir.as_str()];
    args.extend(script);
    run_testbed_script("python-image.sh", &args).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_env_sh() {
        let v = k8s_version();
        assert!(v.starts_with("1."), "{v}");
        assert!(k8s_bin_dir().to_string_lossy().contains(&format!("v{v}")));
    }

    #[test]
    fn suffixes_are_dns_labels_and_differ() {
        let a = random_suffix();
        let b = random_suffix();
        assert_eq!(a.len(), 6);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
    }
}
