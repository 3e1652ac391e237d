//! `kprof-operator`: `run` the operator, or print the `crd`s.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use kprof_operator::{Operator, OperatorConfig, http};
use kprof_store as store;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "kprof-operator",
    version,
    about = "The kprof operator: schedules the profiling agent for ProfilingTargets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions (YAML, one document each).
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Operator configuration file (YAML; see the `config` module docs). Absent: defaults.
    #[arg(long, env = "KPROF_CONFIG")]
    config: Option<PathBuf>,
    /// Namespace the operator runs in: the agent DaemonSet and the leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kprof-system")]
    namespace: String,
    /// This replica's identity for leader election and Events (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "KPROF_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "KPROF_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The profile store served next to the operator (`--store-*`).
    #[command(flatten)]
    store: store::StoreArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            let docs = kprof_crds::crd_manifests()?;
            // Each manifest starts its own YAML document.
            let yaml: String = docs.into_iter().map(|m| m.yaml).collect();
            print!("{yaml}");
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.init(),
    }
    let config = match &args.config {
        Some(path) => OperatorConfig::load(path)?,
        None => OperatorConfig::default(),
    };
    let identity = args.identity.clone().unwrap_or_else(hostname);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), namespace = %args.namespace, %identity, "starting kprof-operator");
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;

    // One shutdown signal (SIGTERM or Ctrl-C) for every task.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing in-flight work");
        shutdown_tx.send_replace(true);
    });
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // The profile store runs on every replica (leader or not), sharing the shutdown signal.
    let mut registry = Registry::default();
    let store_metrics = store::StoreMetrics::default();
    store_metrics.register(&mut registry);
    let store_config = store::StoreConfig::from_args(&args.store, &args.namespace);
    let store = store::Store::new(store_config, client.clone(), store_metrics)?
        .bind()
        .await?;
    let store_task = tokio::spawn(store.run(shutdown(shutdown_rx.clone())));

    let operator = Operator::new(client, config, &args.namespace, &identity);
    operator.metrics.register(&mut registry);
    let server = tokio::spawn(http::serve(
        args.http_addr,
        registry,
        operator.health.clone(),
        shutdown(shutdown_rx.clone()),
    ));

    let result = operator.run(shutdown(shutdown_rx.clone())).await;
    // Leadership lost or done: stop the other tasks too.
    server.abort();
    store_task.abort();
    result.context("the operator stopped")
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kprof-operator".into())
}
