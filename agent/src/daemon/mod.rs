//! `kprof-agent run`: the node agent in a Kubernetes cluster.
//!
//! ```text
//! watches (targets, this node's pods) ──plan──▶ sampling thread (eBPF, windows, Profiles)
//!                                                   │ spool (atomic dirs on disk, bounded)
//!                                                   ▼
//!                                      uploader (store PUT + Profile create, retry/backoff)
//! ```
//! `/healthz` and `/metrics` are served on `--metrics-port`. SIGTERM/SIGINT close the open
//! windows (partial Profiles), then the uploader gets `--drain-timeout` to send what it can;
//! the rest stays in the spool and is sent at the next start.
pub mod build;
/// Kept here for the cluster modules that still name it `daemon::metrics`.
pub use crate::metrics;
pub mod driver;
pub mod routing;
pub mod window;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use tokio::sync::{Notify, watch};

use crate::{
    cli::parse_duration,
    k8s::watch::{WatchError, Watches},
    spool::{self, Spool, SpoolError},
    upload::{self, ArtifactSink, Uploader},
};

/// Options of `kprof-agent run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of this node (the DaemonSet passes `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The operator's namespace (informational).
    #[arg(long, env = "KPROF_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// Profile store base URL; without it artifacts stay on the node (`file://` references).
    #[arg(long, env = "KPROF_STORE_URL")]
    pub store_url: Option<String>,
    /// ServiceAccount token presented to the store (re-read for every upload); the DaemonSet
    /// projects one meant for the store's audience only.
    #[arg(long, env = "KPROF_TOKEN_FILE", default_value = upload::DEFAULT_TOKEN_FILE)]
    pub token_file: PathBuf,
    /// CA certificates (PEM) the store's serving certificate is checked against, besides the
    /// system's (re-read for every upload).
    #[arg(long, env = "KPROF_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// State directory: `spool/` and, without a store, `artifacts/`.
    #[arg(long, env = "KPROF_STATE_DIR", default_value = "/var/lib/kprof")]
    pub state_dir: PathBuf,
    /// Most profiles kept in the spool while the store / API server is away.
    #[arg(long, env = "KPROF_SPOOL_MAX_ENTRIES", default_value_t = spool::Limits::default().max_entries)]
    pub spool_max_entries: usize,
    /// Most bytes kept in the spool.
    #[arg(long, env = "KPROF_SPOOL_MAX_BYTES", default_value_t = spool::Limits::default().max_bytes)]
    pub spool_max_bytes: u64,
    /// Port of `/healthz` and `/metrics` (0: off).
    #[arg(long, env = "KPROF_METRICS_PORT", default_value_t = 9464)]
    pub metrics_port: u16,
    /// How often containers are rescanned for new processes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub rescan_interval: Duration,
    /// Time given to the uploader at shutdown.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Do not collect Python frames.
    #[arg(long)]
    pub no_python: bool,
    /// Sampling rate loaded at start, before any target asks for one (then: the highest rate
    /// the node's targets ask for). 0: load the eBPF sampler only when a target needs it.
    #[arg(long, env = "KPROF_SAMPLE_HZ", default_value_t = 99, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub sample_hz: u32,
    /// Started as root: hand the state directory to this user and switch to it at start-up,
    /// keeping every capability but CHOWN, SETUID and SETGID (0: stay as started). The
    /// DaemonSet passes 65532.
    #[arg(long, env = "KPROF_RUN_AS_USER", default_value_t = 0)]
    pub run_as_user: u32,
    /// The group to switch to with `--run-as-user` (default: the same number).
    #[arg(long, env = "KPROF_RUN_AS_GROUP")]
    pub run_as_group: Option<u32>,
    /// Install the agent's seccomp deny list (ptrace, process_vm_writev, mounts, namespaces,
    /// modules, kexec, keys, ...; see `privilege::DENIED`) and refuse to run unless its
    /// self-test sees it enforced.
    #[arg(long, env = "KPROF_SECCOMP", default_value_t = true, action = clap::ArgAction::Set)]
    pub seccomp: bool,
}

/// Errors of `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("no Kubernetes client configuration: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error("the sampling thread panicked")]
    SamplerPanic,
    #[error("least privilege: {0}")]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error("least privilege: {0}")]
    SeccompSelfTest(String),
}

/// Runs the agent until SIGTERM / SIGINT.
pub fn run(args: RunArgs) -> Result<(), RunError> {
    // First, while the process has one thread: shed what only start-up needs.
    least_privilege(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kprof-agent")
        .build()
        .map_err(RunError::Runtime)?;
    rt.block_on(run_async(args))
}

/// Switches to `--run-as-user` and installs the seccomp deny list (see [`crate::privilege`]).
fn least_privilege(args: &RunArgs) -> Result<(), RunError> {
    use crate::privilege;
    let uid = args.run_as_user;
    let gid = args.run_as_group.unwrap_or(uid);
    let rights = privilege::drop_to(uid, gid, &args.state_dir)?;
    let mut enforced = false;
    if args.seccomp {
        privilege::install_seccomp()?;
        privilege::seccomp_self_test().map_err(RunError::SeccompSelfTest)?;
        enforced = true;
    }
    crate::metrics::set_rights(rights.uid, enforced);
    tracing::info!(
        uid = rights.uid,
        gid = rights.gid,
        capabilities = ?rights.cap_names(),
        seccomp = if enforced { "deny list enforced" } else { "off" },
        "running with"
    );
    Ok(())
}

async fn run_async(args: RunArgs) -> Result<(), RunError> {
    tracing::info!(node = %args.node_name, store = ?args.store_url, version = env!("CARGO_PKG_VERSION"), "kprof-agent run");
    let spool = Arc::new(Spool::open(
        args.state_dir.join("spool"),
        spool::Limits {
            max_entries: args.spool_max_entries,
            max_bytes: args.spool_max_bytes,
        },
    )?);
    let pending = spool.depth();
    metrics::set_spool_depth(pending);
    if pending > 0 {
        tracing::info!(
            pending,
            "profiles left in the spool from a previous run: sending them"
        );
    }
    let shared = Arc::new(driver::Shared::default());

    if args.metrics_port != 0 {
        let addr = SocketAddr::from(([0, 0, 0, 0], args.metrics_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        let health = shared.clone();
        let app = Router::new()
            .route(
                "/healthz",
                get(move || {
                    let health = health.clone();
                    async move {
                        let lag = health.since_heartbeat();
                        if lag < Duration::from_secs(10) {
                            (StatusCode::OK, "ok\n".to_owned())
                        } else {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("sampling thread stuck for {lag:?}\n"),
                            )
                        }
                    }
                }),
            )
            .route("/metrics", get(|| async { metrics::render() }));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }

    let client = kube::Client::try_default().await.map_err(RunError::Kube)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let sink = match &args.store_url {
        Some(url) if !url.is_empty() => ArtifactSink::Store {
            url: url.clone(),
            token_file: args.token_file.clone(),
            ca_file: args.store_ca_file.clone(),
        },
        _ => ArtifactSink::Local {
            dir: upload::local_artifacts_dir(&args.state_dir),
        },
    };
    let uploader = tokio::spawn(upload::run(
        Uploader::new(client.clone(), sink),
        spool.clone(),
        wake.clone(),
        stop_rx,
        args.drain_timeout,
    ));

    let opts = driver::Options {
        node: args.node_name.clone(),
        python: !args.no_python,
        rescan: args.rescan_interval,
        initial_hz: args.sample_hz,
    };
    let thread = {
        let (shared, spool, wake) = (shared.clone(), spool.clone(), wake.clone());
        std::thread::Builder::new()
            .name("kprof-sampler".into())
            .spawn(move || driver::run(opts, shared, spool, wake))
            .map_err(RunError::Runtime)?
    };

    // The watches wait for the API server (with backoff) inside the planner task, so a
    // SIGTERM is honoured even while the API server is away.
    let planner = {
        let (shared, node) = (shared.clone(), args.node_name.clone());
        tokio::spawn(async move {
            let watches = match Watches::start(client, &node).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "watches failed");
                    return;
                }
            };
            tracing::info!("watching ProfilingTargets and the pods of this node");
            let mut last = None;
            loop {
                let plan = watches.plan();
                if last.as_ref() != Some(&plan) {
                    tracing::debug!(targets = plan.len(), "new plan");
                    shared.set_plan(plan.clone());
                    last = Some(plan);
                }
                watches.changed.notified().await;
                // Coalesce bursts of events.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let sampler_done = async move {
        loop {
            if thread.is_finished() {
                return thread.join();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::pin!(sampler_done);
    let early = tokio::select! {
        () = shutdown_signal() => None,
        r = &mut sampler_done => Some(r),
    };
    tracing::info!("shutting down: closing the open windows");
    planner.abort();
    shared.stop.store(true, Ordering::Relaxed);
    let result = match early {
        Some(r) => r,
        None => sampler_done.await,
    };
    let _ = stop_tx.send(true);
    let _ = uploader.await;
    match result {
        Ok(r) => r.map_err(RunError::from),
        Err(_) => Err(RunError::SamplerPanic),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
