//! Killing the profile store during a window loses no profile: the agent spools the windows it
//! cannot upload and delivers them once the store is back.
//!
//! Real pieces: the test bed (API server, kubelet, containerd), a hostNetwork pod burning CPU,
//! `kprof-agent run` as a host process (root, eBPF) with `--store-url` and a ServiceAccount token
//! from a TokenRequest (a pod would have it projected), and the profile store in-process on
//! 127.0.0.1 with a directory backend and TokenReviews against the test bed. The store is shut
//! down (connections refused) for three 5 s windows, then restarted on the same port and directory.
//!
//! Needs the test bed, root, and `cargo build --bins -p kprof-agent` with the same
//! `CARGO_TARGET_DIR`. Without them it prints `SKIPPED` (fails under `KPROF_REQUIRE_CLUSTER=1`).
//!
//! Run: `KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e --test store_outage -- --nocapture`

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kprof_crds::{ArtifactRef, Profile};
use kprof_e2e::{
    TestNamespace,
    agent::{
        AgentProcess, HOT_FUNCTION, SPIN_IMAGE, build_spin_image, create_target, ensure_crds,
        host_network_pod, http_get, kprof_resource, metric, require_root, wait_agent_healthy,
    },
    free_port, http_get_bytes, poll_until, require_cluster, service_account_token,
    wait_pod_running,
};
use kprof_store::{self as store, Digest, StoreConfig, StoreError, StoreMetrics};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, PostParams},
};
use tokio::{sync::oneshot, task::JoinHandle};

/// The shortest window a target may ask for.
const WINDOW: Duration = Duration::from_secs(5);
/// Length of the outage, in windows: from the middle of one window, so at least two whole
/// windows close (and are spooled) while the store is away.
const OUTAGE_WINDOWS: u32 = 3;
/// How long the spool may take to drain after the store is back: the uploader's longest
/// backoff (60 s) plus a window, plus slack for a loaded 2-core machine.
const DRAIN_BOUND: Duration = Duration::from_secs(80);
const APP: &str = "kprof-spin-outage";

/// The store, served in-process until [`StoreServer::kill`].
struct StoreServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StoreError>>,
}

impl StoreServer {
    /// Serves a directory store on `addr`; uploads are allowed for `uploader` only.
    async fn start(dir: &Path, addr: SocketAddr, client: Client, uploader: &str) -> Result<Self> {
        let config = StoreConfig::for_dir(dir, addr, uploader);
        let bound = store::Store::new(config, client, StoreMetrics::default())?
            .bind()
            .await
            .with_context(|| format!("binding the store to {addr}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Ok(StoreServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Shuts the server down: the listener is closed and so are the connections the agent keeps
    /// alive (a merely aborted accept loop would leave those served). Checks that a new
    /// connection is refused.
    async fn kill(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Graceful shutdown only waits for requests in flight; one stuck on a TokenReview
        // must not keep the store "up" for long.
        match tokio::time::timeout(Duration::from_secs(10), &mut self.task).await {
            Ok(r) => r.context("store task")??,
            Err(_) => {
                eprintln!("store: graceful shutdown took over 10s; aborting it");
                self.task.abort();
            }
        }
        match tokio::net::TcpStream::connect(self.addr).await {
            Ok(_) => bail!(
                "the store still accepts connections on {} after shutdown",
                self.addr
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => bail!("connecting to the stopped store: unexpected {e}"),
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Start and end of a Profile's window, in ms since the epoch.
fn window_ms(p: &Profile) -> (i64, i64) {
    (
        p.spec.window_start.0.as_millisecond(),
        p.spec.window_end.0.as_millisecond(),
    )
}

/// Entries waiting in the agent's spool directory (`.tmp-` ones are half written).
fn spool_entries(state: &Path) -> usize {
    std::fs::read_dir(state.join("spool"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
        .count()
}

/// What the agent's `/metrics` says about the spool and uploads.
#[derive(Debug, Default, Clone, Copy)]
struct AgentFigures {
    spool_depth: f64,
    spooled: f64,
    written: f64,
    dropped: f64,
    store_errors: f64,
}

fn agent_figures(metrics_port: u16) -> Result<AgentFigures> {
    let text = http_get(metrics_port, "/metrics")?;
    let get = |series: &str| metric(&text, series).unwrap_or(0.0);
    ensure!(
        metric(&text, "kprof_agent_spool_depth").is_some(),
        "no spool depth in the agent's metrics:\n{text}"
    );
    Ok(AgentFigures {
        spool_depth: get("kprof_agent_spool_depth"),
        spooled: get("kprof_agent_profiles_spooled_total"),
        written: get("kprof_agent_profiles_written_total"),
        dropped: get("kprof_agent_spool_dropped_total"),
        store_errors: get("kprof_agent_errors_total{category=\"store\"}"),
    })
}

/// Fetches an artifact from the store by its digest and checks bytes, digest, size and URL.
async fn fetch_artifact(store: &str, what: &str, a: Option<&ArtifactRef>) -> Result<Vec<u8>> {
    let a = a.with_context(|| format!("no {what} artifact"))?;
    ensure!(
        a.url == format!("http://{store}/v1/artifacts/{}", a.digest),
        "{what} URL {} is not the store's URL for {}",
        a.url,
        a.digest
    );
    let (status, bytes) = http_get_bytes(
        store,
        &format!("/apis/data.kprof.io/v1alpha1/artifacts/{}", a.digest),
    )
    .await?;
    ensure!(
        status == 200,
        "{what} {}: store answered {status}",
        a.digest
    );
    ensure!(
        Digest::of(&bytes).to_string() == a.digest,
        "{what}: the store's bytes hash to {}, the Profile says {}",
        Digest::of(&bytes),
        a.digest
    );
    ensure!(
        bytes.len() as u64 == a.size_bytes,
        "{what}: {} bytes, the Profile says {}",
        bytes.len(),
        a.size_bytes
    );
    Ok(bytes)
}

/// Fetches and reads a Profile's pprof and flame graph; returns the pprof bytes.
async fn check_artifacts(store: &str, p: &Profile) -> Result<Vec<u8>> {
    let name = p.metadata.name.as_deref().unwrap_or("?");
    let pprof = fetch_artifact(store, "pprof", p.spec.artifacts.pprof.as_ref())
        .await
        .with_context(|| format!("Profile {name}"))?;
    let svg = fetch_artifact(store, "flamegraph", p.spec.artifacts.flamegraph.as_ref())
        .await
        .with_context(|| format!("Profile {name}"))?;
    let svg = String::from_utf8_lossy(&svg);
    ensure!(
        svg.contains("<svg") && svg.contains(HOT_FUNCTION),
        "Profile {name}: the flame graph is not an SVG of {HOT_FUNCTION}"
    );
    // The repo's own decoder: the samples in the pprof are the ones the Profile counts.
    let decoded = store::pprof::Profile::decode_bytes(&pprof)
        .with_context(|| format!("Profile {name}: decoding the pprof"))?;
    let idx = decoded
        .value_index(Some("samples"))
        .with_context(|| format!("Profile {name}: no `samples` value in the pprof"))?;
    let total: i64 = decoded.sample.iter().map(|s| s.value[idx]).sum();
    ensure!(
        u64::try_from(total).ok() == Some(p.spec.samples),
        "Profile {name}: the pprof holds {total} samples, the Profile says {}",
        p.spec.samples
    );
    ensure!(
        decoded
            .function
            .iter()
            .any(|f| decoded.str(f.name) == HOT_FUNCTION),
        "Profile {name}: {HOT_FUNCTION} is not among the pprof's functions"
    );
    Ok(pprof)
}

/// `go tool pprof -top` on the bytes; the hottest function must be the workload's.
fn go_tool_pprof_top(dir: &Path, name: &str, pprof: &[u8]) -> Result<Option<String>> {
    let go = Path::new("/usr/local/go/bin/go");
    if !go.exists() {
        return Ok(None);
    }
    let path = dir.join(format!("{name}.pb.gz"));
    std::fs::write(&path, pprof)?;
    // PPROF_TMPDIR keeps pprof's files out of $HOME; $HOME itself stays (the Go build cache).
    let out = std::process::Command::new(go)
        .args(["tool", "pprof", "-top"])
        .arg(&path)
        .env("PPROF_TMPDIR", dir)
        .output()
        .context("running go tool pprof")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "go tool pprof -top {name}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or_default();
    ensure!(
        first.contains(HOT_FUNCTION),
        "go tool pprof -top {name}: the hottest function is not {HOT_FUNCTION}:\n{stdout}"
    );
    let total = stdout
        .lines()
        .find(|l| l.starts_with("Duration:"))
        .unwrap_or_default();
    Ok(Some(format!("{total} | top: {}", first.trim())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_loses_no_profile() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    if !require_root()? {
        return Ok(());
    }
    let test_start = Instant::now();
    ensure_crds()?;
    build_spin_image()?;
    let ns = TestNamespace::new(&tb.client, "store-outage").await?;
    let others = Api::<DynamicObject>::all_with(
        tb.client.clone(),
        &kprof_resource("ProfilingTarget", "profilingtargets"),
    )
    .list(&ListParams::default())
    .await?
    .items
    .len();
    if others > 0 {
        // Every agent on the node watches every target: a parallel run could write Profiles too.
        eprintln!("NOTE: {others} other ProfilingTarget(s) on the shared test bed");
    }

    // The agent's identity: on a node it would be the projected token of its ServiceAccount.
    let work = tempfile::tempdir()?;
    let token_file = work.path().join("token");
    let token = service_account_token(&tb.client, ns.name(), "kprof-agent", 3600).await?;
    std::fs::write(&token_file, token)?;
    let uploader = format!("system:serviceaccount:{}:kprof-agent", ns.name());

    let store_dir = work.path().join("store");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let store_url = format!("http://{addr}");
    let store_addr = addr.to_string();
    let server = StoreServer::start(&store_dir, addr, tb.client.clone(), &uploader).await?;

    let pods: Api<Pod> = ns.api();
    let pod = host_network_pod("spin", APP, SPIN_IMAGE, None)?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_running(&pods, "spin", Duration::from_secs(90))
        .await
        .context("the workload pod did not start (test bed problem?)")?;

    let metrics_port = free_port()?;
    let mut agent = AgentProcess::start(&tb.node, metrics_port, |_, cmd| {
        cmd.args(["--store-url", &store_url, "--token-file"])
            .arg(&token_file);
        Ok(())
    })?;
    // On failure, show what the agent and the cluster saw (an error return is no panic, so
    // neither the agent's nor the namespace's drop would print them).
    let outcome: Result<()> = async {
        wait_agent_healthy(metrics_port).await?;

        create_target(&tb.client, ns.name(), "spin", APP, WINDOW.as_secs()).await?;
        let profiles: Api<Profile> = ns.api();

        // 1. The store works: a Profile whose artifacts are in it.
        let applied = Instant::now();
        let first = loop {
            let mut found = None;
            for p in profiles.list(&ListParams::default()).await?.items {
                if p.spec.samples > 0 && check_artifacts(&store_addr, &p).await.is_ok() {
                    found = Some(p);
                    break;
                }
            }
            if let Some(p) = found {
                break p;
            }
            if let Some(st) = agent.exited()? {
                bail!("the agent exited early ({st})");
            }
            if applied.elapsed() > 3 * WINDOW + Duration::from_secs(15) {
                bail!(
                    "no Profile with artifacts in the store within {:?} of the target",
                    applied.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!(
            "first Profile {} ({} samples) with its artifacts in the store {:.1}s after the target",
            first.metadata.name.as_deref().unwrap_or("?"),
            first.spec.samples,
            applied.elapsed().as_secs_f64()
        );

        // 2. Kill the store in the middle of a window.
        let w = WINDOW.as_millis() as i64;
        let now = ms(SystemTime::now());
        let mid = (now / w + 1) * w + w / 2;
        tokio::time::sleep(Duration::from_millis((mid - now) as u64)).await;
        let before = agent_figures(metrics_port)?;
        ensure!(
            before.spool_depth == 0.0 && spool_entries(agent.state_dir()) == 0,
            "the spool should be empty while the store is up: {before:?}"
        );
        server.kill().await?;
        let stopped_at = SystemTime::now();
        let stopped = Instant::now();
        println!(
            "store killed at {} ms (mid-window); connections refused",
            ms(stopped_at)
        );

        // 3. The outage: the agent keeps sampling, spools, says so, and neither crashes nor drops.
        let outage = WINDOW * OUTAGE_WINDOWS;
        let (mut max_disk, mut max_gauge) = (0usize, 0f64);
        let mut during = before;
        while stopped.elapsed() < outage {
            if let Some(st) = agent.exited()? {
                bail!("the agent exited during the outage ({st})");
            }
            let health = http_get(metrics_port, "/healthz")?;
            ensure!(
                health.contains("200 OK"),
                "agent unhealthy during the outage: {health}"
            );
            during = agent_figures(metrics_port)?;
            ensure!(
                during.dropped == 0.0,
                "the agent dropped spooled profiles: {during:?}"
            );
            max_disk = max_disk.max(spool_entries(agent.state_dir()));
            max_gauge = max_gauge.max(during.spool_depth);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let disk_at_restart = spool_entries(agent.state_dir());
        max_disk = max_disk.max(disk_at_restart);
        // The outage ends mid-window too, so no window closes while these figures are taken.
        let w_ms = |t: SystemTime| ms(t) / WINDOW.as_millis() as i64;
        let closed = (w_ms(SystemTime::now()) - w_ms(stopped_at)) as usize;
        let spooled_in_outage = (during.spooled - before.spooled) as usize;
        println!(
            "outage of {:.1}s: {closed} windows closed, {spooled_in_outage} spooled, spool on disk \
             max {max_disk} ({disk_at_restart} at restart), kprof_agent_spool_depth max \
             {max_gauge} ({} at restart), store upload errors +{}",
            stopped.elapsed().as_secs_f64(),
            during.spool_depth,
            during.store_errors - before.store_errors
        );
        ensure!(
            closed >= 2,
            "the outage should span two whole windows, {closed} closed"
        );
        ensure!(
            spooled_in_outage == closed && disk_at_restart == closed,
            "{closed} windows closed while the store was away: {spooled_in_outage} spooled, \
             {disk_at_restart} waiting on disk"
        );
        ensure!(
            during.store_errors > before.store_errors,
            "the agent counted no store upload errors during the outage: {before:?} -> {during:?}"
        );
        ensure!(
            during.written == before.written,
            "profiles written while the store was away: {before:?} -> {during:?}"
        );
        // The gauge is what an alert watches: it must show what waits on disk.
        ensure!(
            during.spool_depth as usize == disk_at_restart,
            "kprof_agent_spool_depth says {} while {disk_at_restart} profiles wait in the spool",
            during.spool_depth
        );

        // 4. The store comes back on the same port and directory; the spool drains.
        let server = StoreServer::start(&store_dir, addr, tb.client.clone(), &uploader).await?;
        let restarted_at = SystemTime::now();
        let restarted = Instant::now();
        let drained = loop {
            if let Some(st) = agent.exited()? {
                bail!("the agent exited after the outage ({st})");
            }
            let f = agent_figures(metrics_port)?;
            if spool_entries(agent.state_dir()) == 0 && f.spool_depth == 0.0 {
                break f;
            }
            if restarted.elapsed() > DRAIN_BOUND {
                bail!(
                    "the spool did not drain within {DRAIN_BOUND:?} of the store's return: {} \
                     entries on disk, {f:?}",
                    spool_entries(agent.state_dir())
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let drain_time = restarted.elapsed();
        println!(
            "store back at {} ms: spool drained in {:.1}s (bound {DRAIN_BOUND:?}); {} profiles \
             written in all",
            ms(restarted_at),
            drain_time.as_secs_f64(),
            drained.written
        );
        ensure!(drained.dropped == 0.0, "profiles dropped: {drained:?}");

        // 5. Every window has its Profile, the outage's too, with windows back to back. The
        // window the store came back in may close just as the spool drains: its Profile is
        // waited for, so that the Profiles span the outage.
        let (stop_ms, restart_ms) = (ms(stopped_at), ms(restarted_at));
        let mut all = poll_until(
            "the Profile of the window the store came back in",
            WINDOW * 3,
            Duration::from_millis(200),
            || {
                let profiles = profiles.clone();
                async move {
                    let all = profiles.list(&ListParams::default()).await?.items;
                    Ok(all
                        .iter()
                        .any(|p| window_ms(p).1 >= restart_ms)
                        .then_some(all))
                }
            },
        )
        .await?;
        all.sort_by_key(window_ms);
        // Window ends are multiples of the window since the epoch: those inside the outage.
        let expected = (restart_ms / w - stop_ms / w) as usize;
        let ended_in_outage = |p: &Profile| (stop_ms..=restart_ms).contains(&window_ms(p).1);
        let in_outage: Vec<&Profile> = all.iter().filter(|p| ended_in_outage(p)).collect();
        println!(
            "{} Profiles in all; {} windows ended during the outage ({expected} expected):",
            all.len(),
            in_outage.len()
        );
        for p in &all {
            let (s, e) = window_ms(p);
            let mark = if ended_in_outage(p) {
                "  <- outage"
            } else {
                ""
            };
            println!(
                "  {} [{s}, {e}] {} samples{mark}",
                p.metadata.name.as_deref().unwrap_or("?"),
                p.spec.samples,
            );
        }
        ensure!(
            expected >= 2,
            "the outage covered only {expected} window ends"
        );
        ensure!(
            in_outage.len() == expected,
            "{expected} windows ended while the store was away, {} have a Profile",
            in_outage.len()
        );
        for pair in all.windows(2) {
            let (a, b) = (window_ms(&pair[0]), window_ms(&pair[1]));
            ensure!(
                b.0 == a.1,
                "windows are not back to back: [{}, {}] then [{}, {}]",
                a.0,
                a.1,
                b.0,
                b.1
            );
        }
        ensure!(
            all.first().map(|p| window_ms(p).1) <= Some(stop_ms)
                && all.last().map(|p| window_ms(p).1) >= Some(restart_ms),
            "the Profiles do not span the outage"
        );

        // 6. Their artifacts are in the store, intact and readable.
        let pprof_dir = work.path().join("pprof");
        std::fs::create_dir_all(&pprof_dir)?;
        for p in &all {
            let pprof = check_artifacts(&store_addr, p).await?;
            ensure!(p.spec.samples > 0, "an empty window: {:?}", p.metadata.name);
            ensure!(
                !p.spec.warnings.iter().any(|w| w.contains("refused")),
                "{:?}: {:?}",
                p.metadata.name,
                p.spec.warnings
            );
            if ended_in_outage(p) {
                let name = p.metadata.name.clone().unwrap_or_default();
                match go_tool_pprof_top(&pprof_dir, &name, &pprof)? {
                    Some(top) => println!("go tool pprof -top {name}: {top}"),
                    None => println!("NOTE: no Go; {name} was read with the repo's decoder only"),
                }
            }
        }

        // A clean stop: SIGTERM flushes and exits 0 with the store up.
        let st = agent.stop(Duration::from_secs(30))?;
        ensure!(st.success(), "agent exit status {st}");
        drop(server);
        println!(
            "FIGURES: windows spooled during the outage {spooled_in_outage} (max {max_disk} \
             waiting), drain after the store came back {:.1}s, outage Profiles {}, total test \
             time {:.1}s",
            drain_time.as_secs_f64(),
            in_outage.len(),
            test_start.elapsed().as_secs_f64()
        );
        Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        eprintln!(
            "{e:#}\n===== kprof-agent log =====\n{}\n===== end =====",
            agent.log()
        );
        eprintln!("{}", ns.dump().await);
    }
    outcome
}
