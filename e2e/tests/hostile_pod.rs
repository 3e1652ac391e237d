//! A hostile pod cannot blind the agent: it maps two copies of its binary and then replaces
//! them at their paths, one with a FIFO (opening it would block the agent's sampling thread for
//! ever) and one with a symlink to `/etc/hostname` (absolute: resolved against the agent's root,
//! it would be the host's file). The agent refuses both (they are not the files the process
//! mapped), counts them, and keeps profiling a well-behaved pod of the same target, and the
//! hostile pod's own code, without a restart.
//!
//! Real pieces: the test bed (API server, kubelet, containerd with overlayfs), two hostNetwork
//! pods (a static C program each, a fifth of a CPU each), and `kprof-agent run` as a host
//! process (root, eBPF, no store).
//!
//! Needs the test bed, root, and `cargo build --bins -p kprof-agent` with the same
//! `CARGO_TARGET_DIR`. Without them it prints `SKIPPED` (fails under `KPROF_REQUIRE_CLUSTER=1`).
//!
//! Run: `KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e --test hostile_pod -- --nocapture`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kprof_crds::Profile;
use kprof_e2e::{
    TestNamespace,
    agent::{
        AgentProcess, HOT_FUNCTION, SPIN_IMAGE, build_spin_image, create_target, ensure_crds,
        host_network_pod, http_get, metric, require_root, static_binary, wait_agent_healthy,
    },
    build_image, free_port, poll_until, require_cluster, wait_pod_running,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

const WINDOW_SECS: u64 = 5;
const APP: &str = "kprof-hostile";
const HOSTILE_IMAGE: &str = "kprof.local/e2e/hostile:1";
const HOSTILE_FUNCTION: &str = "kprof_hostile_hot";
const REPLACED: &str = "kprof_agent_errors_total{category=\"module_replaced\"}";

const HOSTILE_C: &str = r#"
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Maps a copy of this binary at `path` (executable, so the agent looks at it). */
static void map_copy(const char *path) {
    char buf[65536];
    ssize_t n;
    int in = open("/proc/self/exe", O_RDONLY), out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    while ((n = read(in, buf, sizeof buf)) > 0) (void)!write(out, buf, n);
    close(in);
    close(out);
    int fd = open(path, O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    mmap(0, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    close(fd);
}

volatile uint64_t sink;
__attribute__((noinline)) uint64_t kprof_hostile_hot(uint64_t n) {
    uint64_t x = n;
    for (uint64_t i = 0; i < 5000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}

int main(void) {
    mkdir("/evil", 0755);
    map_copy("/evil/libfifo.so");
    unlink("/evil/libfifo.so");
    mkfifo("/evil/libfifo.so", 0644);
    map_copy("/evil/libhost.so");
    unlink("/evil/libhost.so");
    (void)!symlink("/etc/hostname", "/evil/libhost.so");
    for (uint64_t n = 0;; n++) sink = kprof_hostile_hot(n);
}
"#;

/// The Profiles of `pod` with samples, and whether one has `function` on top.
async fn profiles_of(api: &Api<Profile>, pod: &str, function: &str) -> Result<(usize, bool)> {
    let mine: Vec<Profile> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.pod == pod && p.spec.samples > 0)
        .collect();
    let on_top = mine.iter().any(|p| {
        p.spec
            .top_functions
            .first()
            .is_some_and(|f| f.function == function)
    });
    Ok((mine.len(), on_top))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pod_does_not_blind_the_agent() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    if !require_root()? {
        return Ok(());
    }
    ensure_crds()?;
    build_spin_image()?;
    build_image(
        HOSTILE_IMAGE,
        &[&static_binary("kprof-hostile", HOSTILE_C)?],
    )?;
    let ns = TestNamespace::new(&tb.client, "hostile").await?;
    let pods: Api<Pod> = ns.api();
    pods.create(
        &PostParams::default(),
        &host_network_pod("hostile", APP, HOSTILE_IMAGE, Some("200m"))?,
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &host_network_pod("good", APP, SPIN_IMAGE, Some("200m"))?,
    )
    .await?;
    for name in ["hostile", "good"] {
        wait_pod_running(&pods, name, Duration::from_secs(90))
            .await
            .with_context(|| format!("pod {name} did not start"))?;
    }

    let port = free_port()?;
    let mut agent = AgentProcess::start(&tb.node, port, |_, _| Ok(()))?;
    let outcome: Result<()> = async {
        wait_agent_healthy(port).await?;
        create_target(&tb.client, ns.name(), "both", APP, WINDOW_SECS).await?;
        let profiles: Api<Profile> = ns.api();
        let start = Instant::now();
        let unhealthy = std::sync::Mutex::new(None::<String>);
        // Three windows of the good pod, and the hostile pod's own code, while its replaced
        // files are refused and counted; the agent stays healthy all along.
        poll_until(
            "Profiles of both pods with the replaced files counted",
            Duration::from_secs(5 * WINDOW_SECS + 40),
            Duration::from_millis(500),
            || async {
                let health = http_get(port, "/healthz")?;
                if !health.contains("200 OK") {
                    *unhealthy.lock().unwrap() = Some(health);
                }
                let replaced = metric(&http_get(port, "/metrics")?, REPLACED).unwrap_or(0.0);
                let (good, good_top) = profiles_of(&profiles, "good", HOT_FUNCTION).await?;
                let (bad, bad_top) = profiles_of(&profiles, "hostile", HOSTILE_FUNCTION).await?;
                Ok((replaced >= 2.0 && good >= 3 && good_top && bad >= 1 && bad_top)
                    .then_some((replaced, good, bad)))
            },
        )
        .await
        .map(|(replaced, good, bad)| {
            println!(
                "{:.1}s: {good} Profiles of the good pod, {bad} of the hostile one, {replaced} replaced files refused",
                start.elapsed().as_secs_f64()
            )
        })?;
        if let Some(health) = unhealthy.lock().unwrap().take() {
            bail!("the agent was unhealthy: {health}");
        }
        if agent.exited()?.is_some() {
            bail!("the agent exited");
        }
        let log = agent.log();
        if !log.contains("a mapped file is no longer at its path") {
            bail!("the refusal was not logged");
        }
        Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        let log = agent.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "FAILED: {e:#}\n===== kprof-agent log (tail) =====\n{}\n===== {} =====\n{}",
            lines[lines.len().saturating_sub(60)..].join("\n"),
            ns.name(),
            ns.dump().await
        );
    }
    let _ = agent.stop(Duration::from_secs(20));
    outcome
}
