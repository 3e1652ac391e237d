//! Running the real `kprof-agent run` as a host process against the test bed (as root, with the
//! test bed's kubeconfig, no image), plus the CPU-burning workload the agent tests profile.
//!
//! ```no_run
//! use kprof_e2e::agent::{AgentProcess, build_spin_image, ensure_crds, require_root};
//! # fn doc(node: &str) -> anyhow::Result<()> {
//! if !require_root()? { return Ok(()); } // skips loudly, fails under KPROF_REQUIRE_CLUSTER=1
//! ensure_crds()?;
//! build_spin_image()?;
//! let port = kprof_e2e::free_port()?;
//! let agent = AgentProcess::start(node, port, |_state, cmd| {
//!     cmd.args(["--store-url", "http://127.0.0.1:8090"]);
//!     Ok(())
//! })?; // killed, its log printed on panic, its state dir removed, on drop
//! # Ok(()) }
//! ```

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::{build_image, cluster_required, kubeconfig_path, kubectl, poll_until, random_suffix};

/// The image of the CPU-bound workload ([`build_spin_image`]).
pub const SPIN_IMAGE: &str = "kprof.local/e2e/spin:1";
/// The function of [`SPIN_IMAGE`] that burns (nearly) all of its CPU.
pub const HOT_FUNCTION: &str = "kprof_spin_hot";

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

/// A hostNetwork pod `name` labelled `app=<app>` running `image` (imported, never pulled),
/// limited to `cpu_limit` when given (several must not load a 2-core node).
pub fn host_network_pod(
    name: &str,
    app: &str,
    image: &str,
    cpu_limit: Option<&str>,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let mut container = json!({"name": name, "image": image, "imagePullPolicy": "Never"});
    if let Some(cpu) = cpu_limit {
        container["resources"] = json!({"limits": {"cpu": cpu}, "requests": {"cpu": "10m"}});
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "containers": [container]
        }
    }))?)
}

/// Creates a cpu ProfilingTarget `name` in `namespace` ([`profiling_target`]).
pub async fn create_target(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    app: &str,
    window_secs: u64,
) -> Result<()> {
    let targets: kube::Api<DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        namespace,
        &kprof_resource("ProfilingTarget", "profilingtargets"),
    );
    targets
        .create(
            &Default::default(),
            &profiling_target(name, app, window_secs)?,
        )
        .await?;
    Ok(())
}

/// `kprof.io/v1alpha1` resource of `kind` (for dynamic API handles).
pub fn kprof_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kprof.io", "v1alpha1", kind), plural)
}

/// A cpu ProfilingTarget selecting `app=<app>` with a window of `window_secs`.
pub fn profiling_target(name: &str, app: &str, window_secs: u64) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kprof.io/v1alpha1",
        "kind": "ProfilingTarget",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "profileTypes": ["cpu"],
            "sampleHz": 99,
            "window": format!("{window_secs}s"),
        }
    }))?)
}

/// A built binary of this workspace: next to the test's own target dir (so `CARGO_TARGET_DIR`
/// is honoured), or `$<env>` when set.
pub fn workspace_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    // target/debug/deps/<test>-<hash> → target/debug/<name>
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .context("no target dir")?;
    ensure!(
        p.exists(),
        "{} not found: build it with the same CARGO_TARGET_DIR (`cargo build --bins -p kprof-agent`) or set {env}",
        p.display()
    );
    Ok(p)
}

/// The built `kprof-agent` (or `$KPROF_AGENT_BIN`).
pub fn agent_binary() -> Result<PathBuf> {
    workspace_binary("kprof-agent", "KPROF_AGENT_BIN")
}

/// Compiles the CPU-bound workload (static, frame pointers, symbols) into a temp dir named
/// after the source, so that test runs share one binary instead of leaving one each.
pub fn spin_binary() -> Result<PathBuf> {
    static_binary("kprof-spin", SPIN_C)
}

/// Compiles the C program `source` into a static binary named `name` (cached by source).
pub fn static_binary(name: &str, source: &str) -> Result<PathBuf> {
    use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(source);
    let dir = std::env::temp_dir().join(format!("{name}-{hash:016x}"));
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join(name);
    if bin.exists() {
        return Ok(bin);
    }
    // Tests (and test processes) may compile at once: build under a private name, then rename.
    let tmp = format!("{}-{}", std::process::id(), random_suffix());
    let src = dir.join(format!("{name}-{tmp}.c"));
    let out_bin = dir.join(format!("{name}-{tmp}"));
    std::fs::write(&src, source)?;
    let out = Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-static", "-o"])
        .arg(&out_bin)
        .arg(&src)
        .output()
        .context("running cc")?;
    let _ = std::fs::remove_file(&src);
    ensure!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&out_bin, &bin)?;
    Ok(bin)
}

/// Builds [`SPIN_IMAGE`] and imports it into the test bed.
pub fn build_spin_image() -> Result<()> {
    build_image(SPIN_IMAGE, &[&spin_binary()?])
}

/// Installs the kprof CRDs when they are missing (an existing, possibly newer, CRD of the
/// shared test bed is left alone).
pub fn ensure_crds() -> Result<()> {
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

unsafe extern "C" {
    fn geteuid() -> u32;
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

/// `Ok(true)` as root; otherwise prints `SKIPPED` and returns `Ok(false)`, or fails under
/// `KPROF_REQUIRE_CLUSTER=1` (the agent needs root for eBPF).
pub fn require_root() -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if cluster_required() {
        bail!("the agent tests need root (eBPF)");
    }
    eprintln!("SKIPPED: the agent tests need root (eBPF)");
    Ok(false)
}

/// A `kprof-agent run` process on the host; killed (log printed when panicking, state dir
/// removed) on drop.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    state: PathBuf,
}

impl AgentProcess {
    /// Starts `kprof-agent run` for `node` with a fresh `--state-dir` and `/metrics` on
    /// `metrics_port`; `configure` may prepare the state dir and add arguments / environment
    /// before the process starts. `KPROF_STORE_URL` of the test's environment is not passed on.
    pub fn start(
        node: &str,
        metrics_port: u16,
        configure: impl FnOnce(&Path, &mut Command) -> Result<()>,
    ) -> Result<AgentProcess> {
        let state = std::env::temp_dir().join(format!(
            "kprof-e2e-agent-{}-{}",
            std::process::id(),
            random_suffix()
        ));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state)?;
        let log = state.join("agent.log");
        let mut cmd = Command::new(agent_binary()?);
        cmd.args(["run", "--state-dir"])
            .arg(&state)
            .args(["--metrics-port", &metrics_port.to_string()])
            .env("NODE_NAME", node)
            .env("KUBECONFIG", kubeconfig_path())
            .env("KPROF_LOG", "info,kprof_agent=debug")
            .env_remove("KPROF_STORE_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        // Owned from here on: the state dir goes away even if `configure` fails.
        let mut agent = AgentProcess {
            child: None,
            log,
            state,
        };
        configure(&agent.state, &mut cmd)?;
        agent.child = Some(cmd.spawn().context("starting kprof-agent")?);
        Ok(agent)
    }

    /// The agent's `--state-dir` (its spool is `spool/` under it).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The exit status when the agent has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for the exit (killed after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: a signal to our own child.
        unsafe { libc_kill(child.id() as i32, 15) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent did not exit within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for AgentProcess {
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

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`; the whole response (status line, headers, body).
pub fn http_get(port: u16, path: &str) -> Result<String> {
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

/// Waits (up to 30 s) until the agent serving `/healthz` on `port` answers 200.
pub async fn wait_agent_healthy(port: u16) -> Result<()> {
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
    .await
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `kprof_agent_errors_total{category="store"}`; `None` when absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        // `series` must be the whole name (+ labels), not a prefix of a longer one.
        rest.starts_with(' ')
            .then(|| rest.split_whitespace().next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_finds_whole_series_only() {
        let text = "# HELP x\nkprof_agent_spool_depth 3\nkprof_agent_spool_depth_max 9\n\
                    kprof_agent_errors_total{category=\"store\"} 12\n";
        assert_eq!(metric(text, "kprof_agent_spool_depth"), Some(3.0));
        assert_eq!(
            metric(text, "kprof_agent_errors_total{category=\"store\"}"),
            Some(12.0)
        );
        assert_eq!(
            metric(text, "kprof_agent_errors_total{category=\"api\"}"),
            None
        );
        assert_eq!(metric(text, "kprof_agent_spool"), None);
    }
}
