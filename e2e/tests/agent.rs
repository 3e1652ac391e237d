//! `kprof-agent run` against the real test bed: the agent binary runs ON THE HOST (as root,
//! with the test bed's kubeconfig and `NODE_NAME` = the test bed's node, no image), a hostNetwork
//! pod burns CPU in a C function, and a ProfilingTarget with `window: 5s` selects it.
//!
//! Needs: the test bed (`e2e/testbed/up.sh`), root, and a built agent with its eBPF programs:
//! `cargo build -p kprof-agent` (the test looks for `kprof-agent` next to its own target dir, or
//! at `$KPROF_AGENT_BIN`). Without the test bed it prints `SKIPPED` (fails under
//! `KPROF_REQUIRE_CLUSTER=1`).
//!
//! Run: `cargo test -p kprof-e2e --test agent -- --nocapture`

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kprof_e2e::{
    TestBed, TestNamespace, build_image, free_port, kubeconfig_path, kubectl, poll_until,
    random_suffix, require_cluster, wait_pod_running,
};
use kube::{
    Api,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
};
use serde_json::json;

const IMAGE: &str = "kprof.local/e2e/spin:1";
const HOT_FUNCTION: &str = "kprof_spin_hot";
const WINDOW_SECS: u64 = 5;

/// A CPU-bound C program whose time goes to one named function.
const SPIN_C: &str = r#"
#include <stdint.h>
volatile uint64_t sink;
__attribute__((noinline)) uint64_t kprof_spin_hot(uint64_t n) {
    uint64_t x = n;
    for (uint64_t i = 0; i < 5000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}
int main(void) { for (uint64_t n = 0;; n++) sink = kprof_spin_hot(n); }
"#;

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kprof.io", "v1alpha1", kind), plural)
}

fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KPROF_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    // target/debug/deps/agent-<hash> → target/debug/kprof-agent
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("kprof-agent"))
        .context("no target dir")?;
    ensure!(
        p.exists(),
        "{} not found: run `cargo build -p kprof-agent` (same CARGO_TARGET_DIR) or set KPROF_AGENT_BIN",
        p.display()
    );
    Ok(p)
}

/// Compiles the CPU-bound workload (static, frame pointers, symbols).
fn spin_binary() -> Result<PathBuf> {
    // Tests run in parallel: compile once.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("kprof-e2e-spin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("kprof-spin");
    if bin.exists() {
        return Ok(bin);
    }
    let src = dir.join("spin.c");
    std::fs::write(&src, SPIN_C)?;
    let out = Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-static", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running cc")?;
    ensure!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(bin)
}

fn build_spin_image() -> Result<()> {
    build_image(IMAGE, &[&spin_binary()?])
}

fn ensure_crds() -> Result<()> {
    let have = kubectl()
        .args([
            "get",
            "crd",
            "profilingtargets.kprof.io",
            "profiles.kprof.io",
        ])
        .output()?;
    if have.status.success() {
        return Ok(());
    }
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let out = kubectl()
        .args(["apply", "-f"])
        .arg(crds.join("profilingtargets.yaml"))
        .arg("-f")
        .arg(crds.join("profiles.yaml"))
        .output()?;
    ensure!(
        out.status.success(),
        "installing the CRDs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/profilingtargets.kprof.io",
            "crd/profiles.kprof.io",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "CRDs not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The agent process; killed (and its log printed) on drop.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    state: PathBuf,
}

impl Agent {
    /// Starts `kprof-agent run`; `leftover` is a Profile put in the spool first, as a previous
    /// run that could not reach the API server would have left it.
    fn start(node: &str, metrics_port: u16, leftover: Option<&serde_json::Value>) -> Result<Agent> {
        let state = std::env::temp_dir().join(format!(
            "kprof-e2e-agent-{}-{}",
            std::process::id(),
            random_suffix()
        ));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state)?;
        if let Some(profile) = leftover {
            let entry = state.join("spool").join("00000000000001-000000-leftover");
            std::fs::create_dir_all(&entry)?;
            let manifest = json!({"profile": profile, "artifacts": []});
            std::fs::write(entry.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
        }
        let log = state.join("agent.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(agent_binary()?)
            .args(["run", "--state-dir"])
            .arg(&state)
            .args(["--metrics-port", &metrics_port.to_string()])
            .env("NODE_NAME", node)
            .env("KUBECONFIG", kubeconfig_path())
            .env("KPROF_LOG", "info,kprof_agent=debug")
            .env_remove("KPROF_STORE_URL")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting kprof-agent")?;
        Ok(Agent {
            child: Some(child),
            log,
            state,
        })
    }

    /// The exit status when the agent has exited.
    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: signal to our own child.
        unsafe { libc_kill(child.id() as i32, 15) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                bail!("agent did not exit within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== kprof-agent log =====\n{}\n===== end =====",
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn target(name: &str, app: &str) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kprof.io/v1alpha1",
        "kind": "ProfilingTarget",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "profileTypes": ["cpu"],
            "sampleHz": 99,
            "window": format!("{WINDOW_SECS}s"),
        }
    }))?)
}

/// A Profile as a previous agent run would have spooled it.
fn leftover_profile(ns: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kprof.io/v1alpha1", "kind": "Profile",
        "metadata": {"name": "leftover", "namespace": ns, "labels": {"kprof.io/target": "spin"}},
        "spec": {
            "target": "spin", "pod": "spin", "container": "spin", "node": node, "runtime": "native",
            "profileType": "cpu", "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-01T00:00:05Z",
            "sampleHz": 99, "samples": 0, "warnings": ["spooled by a previous run"]
        }
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

/// Skips (or fails under KPROF_REQUIRE_CLUSTER=1) when not root.
fn require_root() -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if kprof_e2e::cluster_required() {
        bail!("the agent tests need root (eBPF)");
    }
    eprintln!("SKIPPED: the agent tests need root (eBPF)");
    Ok(false)
}

/// What the scenario expects the Profile to name.
struct Expect<'a> {
    node: &'a str,
    pod: &'a str,
    container: &'a str,
    app: &'a str,
}

/// Starts the agent for `node`, applies a decoy target (same label, other namespace) and the
/// real target, and checks the first Profile, the decoy's silence, metrics and shutdown.
async fn scenario(
    tb: &TestBed,
    ns: &TestNamespace,
    other: &TestNamespace,
    want: &Expect<'_>,
) -> Result<()> {
    let port = free_port()?;
    let leftover = leftover_profile(ns.name(), want.node);
    let mut agent = Agent::start(want.node, port, Some(&leftover))?;

    let pt = resource("ProfilingTarget", "profilingtargets");
    let pr = resource("Profile", "profiles");
    let targets_here: Api<DynamicObject> = Api::namespaced_with(tb.client.clone(), ns.name(), &pt);
    let targets_other: Api<DynamicObject> =
        Api::namespaced_with(tb.client.clone(), other.name(), &pt);
    let profiles_here: Api<DynamicObject> = Api::namespaced_with(tb.client.clone(), ns.name(), &pr);
    let profiles_other: Api<DynamicObject> =
        Api::namespaced_with(tb.client.clone(), other.name(), &pr);

    // Same label, other namespace: must never get this pod.
    targets_other
        .create(&PostParams::default(), &target("decoy", want.app)?)
        .await?;
    // Let the agent start (health endpoint up) so the figure below is apply → Profile.
    poll_until(
        "agent /healthz",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            Ok(http_get(port, "/healthz")
                .ok()
                .filter(|r| r.contains("200 OK"))
                .map(|_| ()))
        },
    )
    .await?;
    // The spool left by a "previous run" is drained at start.
    poll_until(
        "the spooled Profile of a previous run",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async { Ok(profiles_here.get_opt("leftover").await?.map(|_| ())) },
    )
    .await?;
    let applied = Instant::now();
    let created = targets_here
        .create(&PostParams::default(), &target("spin", want.app)?)
        .await?;
    let target_uid = created.metadata.uid.clone().context("uid")?;

    let deadline = Duration::from_secs(WINDOW_SECS + 10);
    let profile = loop {
        let list = profiles_here.list(&ListParams::default()).await?;
        if let Some(p) = list
            .items
            .into_iter()
            .find(|p| p.data["spec"]["samples"].as_u64().unwrap_or(0) > 0)
        {
            break p;
        }
        if let Some(st) = agent.exited()? {
            bail!("the agent exited early ({st}):\n{}", agent.log());
        }
        if applied.elapsed() > deadline {
            bail!(
                "no Profile with samples within {deadline:?} of the target's creation\nagent log:\n{}",
                agent.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let first = applied.elapsed();
    eprintln!(
        "FIGURE: target apply -> first Profile with samples: {:.1}s (window {WINDOW_SECS}s)",
        first.as_secs_f64()
    );
    eprintln!("{}", serde_json::to_string_pretty(&profile.data["spec"])?);

    let spec = &profile.data["spec"];
    assert_eq!(profile.metadata.namespace.as_deref(), Some(ns.name()));
    assert_eq!(spec["target"], "spin");
    assert_eq!(spec["pod"], want.pod);
    assert_eq!(spec["container"], want.container);
    assert_eq!(spec["node"], want.node);
    assert_eq!(spec["profileType"], "cpu");
    assert_eq!(spec["runtime"], "native");
    assert!(spec["samples"].as_u64().unwrap_or(0) > 0);
    let tops: Vec<&str> = spec["topFunctions"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["function"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        spec["top"].as_str().unwrap_or("").contains(HOT_FUNCTION) || tops.contains(&HOT_FUNCTION),
        "top function from the workload: top={} topFunctions={tops:?}",
        spec["top"]
    );
    let cores = spec["cpuCores"].as_f64().unwrap_or(0.0);
    assert!(
        cores > 0.02 && cores < 2.5,
        "one spinning thread on a shared 2-core machine, got {cores}"
    );
    let labels: BTreeMap<String, String> = profile.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("kprof.io/target").map(String::as_str),
        Some("spin")
    );
    assert_eq!(
        labels.get("kprof.io/pod").map(String::as_str),
        Some(want.pod)
    );
    assert_eq!(
        labels.get("kprof.io/container").map(String::as_str),
        Some(want.container)
    );
    assert_eq!(labels.get("kprof.io/type").map(String::as_str), Some("cpu"));
    assert_eq!(
        labels.get("kprof.io/node").map(String::as_str),
        Some(want.node)
    );
    let owners = profile
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].uid.as_str()),
        ("ProfilingTarget", target_uid.as_str())
    );
    assert_eq!(owners[0].controller, Some(false));
    let pprof_url = spec["artifacts"]["pprof"]["url"].as_str().unwrap_or("");
    assert!(
        pprof_url.starts_with("file://"),
        "no store configured: file:// artifacts, got {pprof_url:?}"
    );
    let pprof_path = pprof_url.trim_start_matches("file://");
    let size = std::fs::metadata(pprof_path)
        .with_context(|| format!("artifact {pprof_path}"))?
        .len();
    assert_eq!(Some(size), spec["artifacts"]["pprof"]["sizeBytes"].as_u64());
    assert!(
        spec["artifacts"]["flamegraph"]["digest"]
            .as_str()
            .unwrap_or("")
            .starts_with("sha256:")
    );

    // The decoy target in the other namespace selects the same label: nothing for it.
    let decoy = profiles_other.list(&ListParams::default()).await?;
    assert!(
        decoy.items.is_empty(),
        "a target got a pod of another namespace: {:?}",
        decoy.items
    );

    let metrics = http_get(port, "/metrics")?;
    assert!(
        metrics.contains("kprof_agent_profiles_written_total"),
        "{metrics}"
    );
    assert!(metrics.contains("kprof_agent_samples_total"), "{metrics}");

    // Graceful shutdown: SIGTERM flushes the open window (a partial Profile) and exits 0.
    let before = profiles_here
        .list(&ListParams::default())
        .await?
        .items
        .len();
    let st = agent.stop(Duration::from_secs(30))?;
    let log = agent.log();
    assert!(st.success(), "agent exit status {st}\n{log}");
    let after = profiles_here
        .list(&ListParams::default())
        .await?
        .items
        .len();
    eprintln!("profiles before SIGTERM {before}, after {after}");
    assert!(
        after > before,
        "the open window was flushed at shutdown\n{log}"
    );
    ensure!(
        profiles_other
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "decoy namespace got profiles"
    );
    Ok(())
}

/// The real thing: a hostNetwork pod of the test bed runs the workload in a container.
#[tokio::test]
async fn agent_writes_profiles_for_selected_pods_on_its_node() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    if !require_root()? {
        return Ok(());
    }
    eprintln!("agent binary: {}", agent_binary()?.display());
    ensure_crds()?;
    build_spin_image()?;

    let ns = TestNamespace::new(&tb.client, "agent").await?;
    let other = TestNamespace::new(&tb.client, "agent-other").await?;
    let app = "kprof-spin";
    let pods: Api<Pod> = ns.api();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "spin", "labels": {"app": app}},
        "spec": {
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "containers": [{"name": "spin", "image": IMAGE, "imagePullPolicy": "Never"}]
        }
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    if let Err(e) = wait_pod_running(&pods, "spin", Duration::from_secs(90)).await {
        panic!("the workload pod did not start (test bed problem?): {e:#}");
    }
    scenario(
        &tb,
        &ns,
        &other,
        &Expect {
            node: &tb.node,
            pod: "spin",
            container: "spin",
            app,
        },
    )
    .await
}

/// A container simulated on the host, for when pods cannot run: a Node object with no kubelet,
/// a Pod bound to it whose status (written by the test, as a kubelet would) names a container
/// id, and a host process in a cgroup `…/pod<uid>/<id>` — the same cgroup path shape a
/// cgroupfs-driver kubelet makes. Everything else (API server, watches, eBPF, Profiles) is real.
#[tokio::test]
async fn agent_profiles_a_simulated_container_on_a_virtual_node() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    if !require_root()? {
        return Ok(());
    }
    ensure_crds()?;
    let sim = SimulatedContainer::start(&tb).await?;
    let other = TestNamespace::new(&tb.client, "agent-sim-other").await?;
    let want = Expect {
        node: &sim.node,
        pod: "spin",
        container: "spin",
        app: "kprof-spin-sim",
    };
    let result = scenario(&tb, &sim.ns, &other, &want).await;
    sim.stop().await;
    result
}

/// Node + Pod objects and a host process in a container-shaped cgroup.
struct SimulatedContainer {
    node: String,
    ns: TestNamespace,
    client: kube::Client,
    child: Child,
    cgroup_root: PathBuf,
}

impl SimulatedContainer {
    async fn start(tb: &TestBed) -> Result<SimulatedContainer> {
        let hierarchy = [
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists())
        .context("no writable cgroup hierarchy")?;
        let node = format!("kprof-virtual-{}", random_suffix());
        let nodes: Api<Node> = Api::all(tb.client.clone());
        let n: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"kprof.io/e2e": "true"}},
            "spec": {"taints": [{"key": "kprof.io/virtual", "effect": "NoSchedule"}]}
        }))?;
        nodes.create(&PostParams::default(), &n).await?;
        let ns = TestNamespace::new(&tb.client, "agent-sim").await?;
        let pods: Api<Pod> = ns.api();
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "spin", "labels": {"app": "kprof-spin-sim"}},
            "spec": {
                "nodeName": node,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "spin", "image": IMAGE}]
            }
        }))?;
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let uid = pod.metadata.uid.clone().context("pod uid")?;
        let id: String = {
            let s = format!("{:016x}", rand_u64());
            s.repeat(4)
        };
        let cgroup_root = hierarchy.join(format!("kprof-e2e-{}", random_suffix()));
        let cg = cgroup_root.join(format!("pod{uid}")).join(&id);
        std::fs::create_dir_all(&cg).with_context(|| format!("mkdir {}", cg.display()))?;
        let child = Command::new(spin_binary()?)
            .spawn()
            .context("starting the workload")?;
        std::fs::write(cg.join("cgroup.procs"), child.id().to_string())
            .with_context(|| format!("moving the workload into {}", cg.display()))?;
        let status = json!({"status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "spin", "image": IMAGE, "imageID": "", "ready": true, "restartCount": 0,
                "containerID": format!("containerd://{id}"),
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
            }]
        }});
        pods.patch_status("spin", &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(SimulatedContainer {
            node,
            ns,
            client: tb.client.clone(),
            child,
            cgroup_root,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leaf first.
        if let Ok(pods) = std::fs::read_dir(&self.cgroup_root) {
            for p in pods.flatten() {
                if let Ok(cs) = std::fs::read_dir(p.path()) {
                    for c in cs.flatten().filter(|c| c.path().is_dir()) {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
                let _ = std::fs::remove_dir(p.path());
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
        let _ = Api::<Node>::all(self.client.clone())
            .delete(&self.node, &DeleteParams::default())
            .await;
        drop(self.ns);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
