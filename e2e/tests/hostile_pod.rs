//! A hostile pod cannot blind the agent. It maps copies of its binary and then:
//! - replaces one at its path with a FIFO (opening it would block the agent's sampling thread
//!   for ever) and one with a symlink to `/etc/hostname` (absolute: resolved against the
//!   agent's root, it would be the host's file) — the agent refuses both and counts them;
//! - keeps a third, `libtrunc.so`, and has a thread run with a forged frame pointer whose
//!   return address walks through that library's code, so the agent symbolizes ever new
//!   addresses of it; after 15 s it truncates the file (an agent that maps the files it
//!   symbolizes dies of SIGBUS on its next read past the new end).
//!
//! A third pod runs a fake interpreter: a C program named `python3.10` with a `_PyRuntime` of
//! zeros and a `.rodata` that ends in a version without its NUL. The agent keeps profiling a
//! well-behaved pod of the same target, and the hostile pods' own code, without a restart, and
//! after the truncation too.
//!
//! Real pieces: the test bed (API server, kubelet, containerd with overlayfs), three
//! hostNetwork pods (static C programs, a fifth of a CPU each), and `kprof-agent run` as a host
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

const FAKE_PYTHON_IMAGE: &str = "kprof.local/e2e/fake-python:1";
const FAKE_PYTHON_FUNCTION: &str = "kprof_fake_python_hot";
/// When the hostile program truncates `libtrunc.so`, after it started.
const TRUNCATE_AFTER: Duration = Duration::from_secs(15);

const HOSTILE_C: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

extern char __executable_start[], etext[];

/* Maps a copy of this binary at `path` (executable, so the agent looks at it). */
static char *map_copy(const char *path) {
    char buf[65536];
    ssize_t n;
    int in = open("/proc/self/exe", O_RDONLY), out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    while ((n = read(in, buf, sizeof buf)) > 0) (void)!write(out, buf, n);
    close(in);
    close(out);
    int fd = open(path, O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    char *base = mmap(0, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    close(fd);
    return base;
}

/* A frame whose caller is said to be in libtrunc.so: {saved frame pointer, return address}. */
static volatile uint64_t fake_frame[2];
static const struct timespec nap = {0, 9000000};

/* Runs (a tenth of the time) with the frame pointer at `fake_frame`; never returns. */
static void *forged_frames(void *unused) {
    __asm__ volatile(
        "mov %0, %%rbp\n"
        "2: mov $3000000, %%rcx\n"
        "1: dec %%rcx\n"
        "jnz 1b\n"
        "mov $35, %%eax\n" /* nanosleep(&nap, 0) */
        "mov %1, %%rdi\n"
        "xor %%esi, %%esi\n"
        "syscall\n"
        "jmp 2b\n"
        :: "r"(fake_frame), "r"(&nap) : "rax", "rcx", "rdi", "rsi", "r11", "memory");
    return unused;
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
    /* Return addresses all through libtrunc.so's copy of the code, 64 bytes apart. */
    char *lib = map_copy("/evil/libtrunc.so");
    uint64_t first = 4096, last = etext - __executable_start, at = first;
    pthread_t t;
    pthread_create(&t, 0, forged_frames, 0);
    time_t start = time(0);
    int truncated = 0;
    for (uint64_t n = 0;; n++) {
        fake_frame[1] = (uint64_t)(lib + at);
        at = at + 64 < last ? at + 64 : first;
        if (!truncated && time(0) - start >= 15) { /* TRUNCATE_AFTER */
            truncated = truncate("/evil/libtrunc.so", 4096) == 0;
        }
        sink = kprof_hostile_hot(n);
    }
}
"#;

/// A fake interpreter ([`fake_python`] replaces its `.rodata`).
const FAKE_PYTHON_C: &str = r#"
#include <stdint.h>
char _PyRuntime[4096];
volatile uint64_t sink;
__attribute__((noinline)) uint64_t kprof_fake_python_hot(uint64_t n) {
    uint64_t x = n + (uint64_t)_PyRuntime[n % 4096];
    for (uint64_t i = 0; i < 5000000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return x;
}
int main(void) {
    for (uint64_t n = 0;; n++) sink = kprof_fake_python_hot(n);
}
"#;

/// `python3.10`: [`FAKE_PYTHON_C`] whose `.rodata` section (as a reader finds it by name) ends
/// in `3.10.99` without a NUL after it. The program's own read-only data, renamed, stays where
/// it runs from.
fn fake_python() -> Result<std::path::PathBuf> {
    let bin = static_binary("python3.10", FAKE_PYTHON_C)?;
    let dir = bin.parent().context("a directory")?.join("fake");
    std::fs::create_dir_all(&dir)?;
    let tail = dir.join("rodata.bin");
    std::fs::write(&tail, b"\0Python \x003.10.99")?;
    let out = dir.join("python3.10");
    let status = std::process::Command::new("objcopy")
        .arg("--rename-section")
        .arg(".rodata=.rodata.real")
        .arg("--add-section")
        .arg(format!(".rodata={}", tail.display()))
        .arg(&bin)
        .arg(&out)
        .status()
        .context("running objcopy")?;
    anyhow::ensure!(status.success(), "objcopy failed");
    Ok(out)
}

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

/// Whether a Profile of `pod` warns that its replaced files were not read.
async fn warned_of_refusals(api: &Api<Profile>, pod: &str) -> Result<bool> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|p| {
            p.spec.pod == pod
                && p.spec
                    .warnings
                    .iter()
                    .any(|w| w.contains("libfifo.so: not a regular file"))
                && p.spec
                    .warnings
                    .iter()
                    .any(|w| w.contains("libhost.so") && w.contains("not symbolized"))
        }))
}

/// Windows of `pod` with samples that began after `after`.
async fn windows_after(
    api: &Api<Profile>,
    pod: &str,
    after: k8s_openapi::jiff::Timestamp,
) -> Result<usize> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|p| p.spec.pod == pod && p.spec.samples > 0 && p.spec.window_start.0 > after)
        .count())
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
    build_image(FAKE_PYTHON_IMAGE, &[&fake_python()?])?;
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
    pods.create(
        &PostParams::default(),
        &host_network_pod("fakepy", APP, FAKE_PYTHON_IMAGE, Some("200m"))?,
    )
    .await?;
    for name in ["hostile", "good", "fakepy"] {
        wait_pod_running(&pods, name, Duration::from_secs(90))
            .await
            .with_context(|| format!("pod {name} did not start"))?;
    }
    // The hostile program truncates its library this long after now, at the latest.
    let truncated_by = k8s_openapi::jiff::Timestamp::now().checked_add(TRUNCATE_AFTER)?;

    let port = free_port()?;
    let mut agent = AgentProcess::start(&tb.node, port, |_, _| Ok(()))?;
    let outcome: Result<()> = async {
        wait_agent_healthy(port).await?;
        create_target(&tb.client, ns.name(), "both", APP, WINDOW_SECS).await?;
        let profiles: Api<Profile> = ns.api();
        let start = Instant::now();
        let unhealthy = std::sync::Mutex::new(None::<String>);
        // Windows of the good pod that began after the truncation, the hostile pods' own code,
        // and the replaced files refused and counted; the agent stays healthy all along.
        poll_until(
            "Profiles of every pod, after the truncation too, with the replaced files counted",
            Duration::from_secs(6 * WINDOW_SECS + 60),
            Duration::from_millis(500),
            || async {
                let health = http_get(port, "/healthz")?;
                if !health.contains("200 OK") {
                    *unhealthy.lock().unwrap() = Some(health);
                }
                let replaced = metric(&http_get(port, "/metrics")?, REPLACED).unwrap_or(0.0);
                let (good, good_top) = profiles_of(&profiles, "good", HOT_FUNCTION).await?;
                let (bad, bad_top) = profiles_of(&profiles, "hostile", HOSTILE_FUNCTION).await?;
                let (fake, fake_top) =
                    profiles_of(&profiles, "fakepy", FAKE_PYTHON_FUNCTION).await?;
                let after = windows_after(&profiles, "good", truncated_by).await?;
                let warned = warned_of_refusals(&profiles, "hostile").await?;
                Ok((replaced >= 2.0
                    && good >= 3
                    && good_top
                    && bad >= 1
                    && bad_top
                    && fake >= 1
                    && fake_top
                    && warned
                    && after >= 2)
                    .then_some((replaced, good, bad, fake, after)))
            },
        )
        .await
        .map(|(replaced, good, bad, fake, after)| {
            println!(
                "{:.1}s: {good} Profiles of the good pod ({after} begun after the truncation), {bad} of the hostile one, {fake} of the fake python, {replaced} replaced files refused",
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
        if !log.contains("a mapped file cannot be read") {
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
