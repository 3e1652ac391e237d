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
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kprof_e2e::{
    TestBed, TestNamespace,
    agent::{
        AgentProcess, HOT_FUNCTION, SPIN_IMAGE as IMAGE, agent_binary, build_spin_image,
        ensure_crds, host_network_pod, http_get, kprof_resource as resource, profiling_target,
        require_root, spin_binary, wait_agent_healthy,
    },
    free_port, poll_until, random_suffix, require_cluster, wait_pod_running,
};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const WINDOW_SECS: u64 = 5;

fn target(name: &str, app: &str) -> Result<DynamicObject> {
    profiling_target(name, app, WINDOW_SECS)
}

/// Starts the agent (no store: `file://` artifacts) with `leftover` put in its spool first, as a
/// previous run that could not reach the API server would have left it.
fn start_agent(
    node: &str,
    metrics_port: u16,
    leftover: &serde_json::Value,
) -> Result<AgentProcess> {
    AgentProcess::start(node, metrics_port, |state, _cmd| {
        let entry = state.join("spool").join("00000000000001-000000-leftover");
        std::fs::create_dir_all(&entry)?;
        let manifest = json!({"profile": leftover, "artifacts": []});
        std::fs::write(entry.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
        Ok(())
    })
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
    let mut agent = start_agent(want.node, port, &leftover)?;

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
    wait_agent_healthy(port).await?;
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
    let pod = host_network_pod("spin", app, IMAGE, None)?;
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
