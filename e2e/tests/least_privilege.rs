//! The agent installed by the Helm chart runs with the fewest rights that work, on the test
//! bed's real node: its process (every thread) is uid/gid 65532 with no supplementary groups,
//! holds exactly BPF, PERFMON, SYS_PTRACE and SYSLOG (nothing in the ambient set, no_new_privs
//! on), runs under two seccomp filters (the runtime's default profile and the agent's deny
//! list, whose start-up self-test saw `ptrace(PTRACE_ATTACH)` and `process_vm_writev` refused),
//! owns its spool directory — and still profiles a Python pod, Python frames on top.
//!
//! Real pieces: the test bed (API server, kubelet, containerd 1.6 with runc), the chart with
//! `e2e/demo/testbed-values.yaml`, the operator and agent images (`make images`;
//! e2e/cluster-tests.sh builds them), the demo shop. The test reads `/proc/<agent pid>/status`
//! on the node, so it needs root (as every cluster test does).
//!
//! Run: `KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e --test least_privilege -- --nocapture`

use std::os::unix::fs::MetadataExt as _;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kprof_crds::Profile;
use kprof_e2e::{
    TestNamespace,
    agent::{http_get, metric},
    build_python_image,
    chart::{SHOP_IMAGE, SYSTEM_NS, install, repo, shop_cpu_profile, start_shop, uninstall},
    require_cluster,
};
use kube::{Api, api::ListParams};

const AGENT_UID: &str = "65532";
/// CAP_SYS_PTRACE (19), CAP_SYSLOG (34), CAP_PERFMON (38), CAP_BPF (39).
const AGENT_CAPS: u64 = (1 << 19) | (1 << 34) | (1 << 38) | (1 << 39);
/// The agent's metrics port (hostNetwork on the test bed).
const METRICS_PORT: u16 = 9464;

/// `Field:\tvalue` of a `/proc/.../status` text.
fn field<'a>(status: &'a str, name: &str) -> Result<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .with_context(|| format!("no {name} in status:\n{status}"))
}

fn hex(status: &str, name: &str) -> Result<u64> {
    Ok(u64::from_str_radix(field(status, name)?, 16)?)
}

/// The host pid of the process of container `id` whose name is `comm`.
fn pid_of_container(id: &str, comm: &str) -> Result<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if cgroup.contains(id) && name.trim_end() == comm {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        _ => bail!("processes named {comm} in container {id}: {found:?}"),
    }
}

#[tokio::test]
async fn the_agent_runs_unprivileged_under_seccomp_and_still_profiles() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    build_python_image(SHOP_IMAGE, &repo().join("e2e/demo/shop"), None)?;
    install(&[])?;
    let ns = TestNamespace::new(&tb.client, "least-privilege").await?;

    // A Python service and a target for it: the agent comes up for it, and still profiles: a
    // CPU Profile of the shop with its Python functions on top.
    start_shop(&ns).await?;
    let profiles: Api<Profile> = ns.api();
    shop_cpu_profile(&profiles).await?;

    // The pod as the chart asks for it: started as uid 0 (without ambient capabilities in the
    // CRI a non-root container has none), no privilege escalation, the runtime's profile.
    let pods: Api<Pod> = Api::namespaced(tb.client.clone(), SYSTEM_NS);
    let agent_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=kprof-agent"))
        .await?;
    let [agent] = &agent_pods.items[..] else {
        bail!("agent pods: {}", agent_pods.items.len());
    };
    let container = &agent.spec.as_ref().unwrap().containers[0];
    let sc = container.security_context.clone().unwrap_or_default();
    ensure!(sc.allow_privilege_escalation == Some(false), "{sc:?}");
    ensure!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) == Some("RuntimeDefault"),
        "{sc:?}"
    );
    let id = agent
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.split("://").nth(1))
        .context("the agent container has no id")?
        .to_owned();

    // The process on the node: every thread unprivileged, exactly the four capabilities,
    // both seccomp filters.
    let pid = pid_of_container(&id, "kprof-agent")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    eprintln!(
        "agent pid {pid}:\n{}",
        status
            .lines()
            .filter(|l| ["Uid", "Gid", "Groups", "Cap", "NoNewPrivs", "Seccomp"]
                .iter()
                .any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(st) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // exited meanwhile
        };
        let tid = task.file_name().to_string_lossy().into_owned();
        let ids = [AGENT_UID; 4].join("\t");
        ensure!(
            field(&st, "Uid")? == ids,
            "thread {tid}: Uid {}",
            field(&st, "Uid")?
        );
        ensure!(
            field(&st, "Gid")? == ids,
            "thread {tid}: Gid {}",
            field(&st, "Gid")?
        );
        ensure!(
            field(&st, "Groups")?.is_empty(),
            "thread {tid}: supplementary groups"
        );
        for set in ["CapEff", "CapPrm"] {
            ensure!(
                hex(&st, set)? == AGENT_CAPS,
                "thread {tid}: {set} {:#x}, expected exactly BPF, PERFMON, SYS_PTRACE, SYSLOG ({AGENT_CAPS:#x})",
                hex(&st, set)?
            );
        }
        ensure!(
            hex(&st, "CapInh")? == 0 && hex(&st, "CapAmb")? == 0,
            "thread {tid}: inheritable or ambient capabilities"
        );
        ensure!(
            field(&st, "NoNewPrivs")? == "1",
            "thread {tid}: no_new_privs off"
        );
        ensure!(
            field(&st, "Seccomp")? == "2",
            "thread {tid}: not in seccomp filter mode"
        );
        let filters: u32 = field(&st, "Seccomp_filters")?.parse()?;
        ensure!(
            filters >= 2,
            "thread {tid}: {filters} seccomp filter(s); expected the runtime's and the agent's"
        );
        threads += 1;
    }
    ensure!(threads > 3, "only {threads} threads checked");

    // The agent's own account: its uid, and a deny list its self-test saw enforced.
    let metrics = http_get(METRICS_PORT, "/metrics")?;
    ensure!(
        metric(&metrics, "kprof_agent_uid") == Some(65532.0),
        "kprof_agent_uid: {:?}",
        metric(&metrics, "kprof_agent_uid")
    );
    ensure!(
        metric(&metrics, "kprof_agent_seccomp_enforced") == Some(1.0),
        "the agent's seccomp self-test did not pass"
    );
    // Its spool directory (a hostPath the kubelet created root-owned) is its own.
    let spool = std::fs::metadata("/var/lib/kprof")?;
    ensure!(
        (spool.uid(), spool.gid()) == (65532, 65532),
        "/var/lib/kprof is {}:{}",
        spool.uid(),
        spool.gid()
    );

    uninstall()?;
    Ok(())
}
