//! The profile store: an HTTP server embedded in the operator that keeps the artifacts agents
//! upload (pprof, flame graph SVG), content-addressed by SHA-256, and serves them, rendered views
//! of them and a small web page. See `docs/store.md` for the API and the security model.
//!
//! * `PUT /v1/artifacts/sha256:{hex}`: upload (agents only: bearer ServiceAccount token checked
//!   with a TokenReview; `X-Kprof-Namespace` names the Profile's namespace). 201 stored, 200
//!   already present, 400 digest mismatch, 401 no/invalid token, 403 not an uploader, 413 too big.
//! * `GET /v1/artifacts/sha256:{hex}`: the bytes.
//! * `GET /v1/profiles/{ns}/{name}/pprof | flamegraph.svg | top`: by Profile (the flame graph is
//!   rendered from the pprof when none was uploaded; `top` is JSON).
//! * `GET /v1/diff.svg?a={ns}/{name}&b={ns}/{name}`: differential flame graph.
//! * `GET /` (+ `/ui/...`): the web page. `GET /metrics`, `GET /healthz`.
//!
//! Start it with [`serve`], or [`Store::bind`] + [`BoundStore::run`] when the caller needs the
//! bound address first (tests: listen on `127.0.0.1:0`).

pub mod access;
mod api;
pub mod auth;
pub mod backend;
mod cloud;
pub mod exporter;
pub mod frontproxy;
pub mod gc;
pub mod metrics;
pub mod otlp;
pub mod placement;
pub mod pprof;
mod server;
mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use backend::{Artifacts, Digest};
pub use metrics::StoreMetrics;

/// Default port of the store's upload listener (and of the `kprof-store` Service).
pub const DEFAULT_PORT: u16 = 8090;
/// Default port of the aggregated API (TLS; the `kprof-api` Service the APIService names).
pub const DEFAULT_API_PORT: u16 = 8443;
/// Name of the Service in front of the store.
pub const SERVICE_NAME: &str = "kprof-store";
pub use kprof_crds::store_api::{NAMESPACE_HEADER, UPLOAD_AUDIENCE};

/// The store's command line, flattened into `kprof-operator run`.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// Address the profile store listens on.
    #[arg(
        long = "store-listen",
        env = "KPROF_STORE_LISTEN",
        default_value = "0.0.0.0:8090"
    )]
    pub store_listen: SocketAddr,
    /// Address of the aggregated API `data.kprof.io` (TLS), through which users read.
    #[arg(
        long = "store-api-listen",
        env = "KPROF_STORE_API_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub store_api_listen: SocketAddr,
    /// Serving certificate of the aggregated API (PEM; its CA is the APIService's caBundle).
    #[arg(
        long = "store-tls-cert-file",
        env = "KPROF_STORE_TLS_CERT_FILE",
        default_value = "/etc/kprof-tls/tls.crt"
    )]
    pub store_tls_cert_file: PathBuf,
    /// Private key of that certificate (PEM).
    #[arg(
        long = "store-tls-key-file",
        env = "KPROF_STORE_TLS_KEY_FILE",
        default_value = "/etc/kprof-tls/tls.key"
    )]
    pub store_tls_key_file: PathBuf,
    /// Directory for artifacts (a PVC or emptyDir), used unless --store-url is given.
    #[arg(
        long = "store-dir",
        env = "KPROF_STORE_DIR",
        default_value = "/var/lib/kprof/store"
    )]
    pub store_dir: PathBuf,
    /// An object_store URL (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///path`,
    /// `memory:///`); credentials, region and endpoint come from the usual AWS_* / GOOGLE_* /
    /// AZURE_* environment variables (e.g. AWS_ENDPOINT + AWS_ALLOW_HTTP for MinIO).
    #[arg(long = "store-url", env = "KPROF_STORE_URL")]
    pub store_url: Option<String>,
    /// Largest artifact accepted, in bytes (larger uploads get 413).
    #[arg(long = "store-max-upload-bytes", env = "KPROF_STORE_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub store_max_upload_bytes: u64,
    /// Identities (TokenReview user names) allowed to upload; default
    /// `system:serviceaccount:<operator namespace>:kprof-agent`.
    #[arg(
        long = "store-allowed-uploader",
        env = "KPROF_STORE_ALLOWED_UPLOADER",
        value_delimiter = ','
    )]
    pub store_allowed_uploader: Vec<String>,
    /// Audience the agents' upload tokens must be meant for (the chart's agents project a
    /// ServiceAccount token for `kprof-store`; the API server's own tokens are then refused);
    /// empty: any token the API server accepts.
    #[arg(
        long = "store-upload-audience",
        env = "KPROF_STORE_UPLOAD_AUDIENCE",
        default_value = ""
    )]
    pub store_upload_audience: String,
    /// Serve uploads over TLS, with the aggregated API's serving certificate (which must name
    /// the `kprof-store` Service); the chart turns it on.
    #[arg(long = "store-tls-uploads", env = "KPROF_STORE_TLS_UPLOADS")]
    pub store_tls_uploads: bool,
    /// Base URL written into artifact URLs; default `http(s)://kprof-store.<operator namespace>.svc:8090`.
    #[arg(long = "store-public-url", env = "KPROF_STORE_PUBLIC_URL")]
    pub store_public_url: Option<String>,
    /// How often unreferenced artifacts are deleted (Go duration; `0s` disables).
    #[arg(long = "store-gc-interval", env = "KPROF_STORE_GC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub store_gc_interval: Duration,
    /// Artifacts younger than this are never collected (an upload precedes its Profile).
    #[arg(long = "store-gc-grace", env = "KPROF_STORE_GC_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub store_gc_grace: Duration,
    /// Push every new Profile of the cluster to this exporter too, besides those its
    /// ProfilingTarget names: `pyroscope=URL` or `otlp=URL` (repeatable, or comma-separated).
    #[arg(
        long = "store-export",
        env = "KPROF_STORE_EXPORT",
        value_delimiter = ',',
        value_parser = exporter::parse_global
    )]
    pub store_export: Vec<kprof_crds::Exporter>,
    /// URL prefixes a ProfilingTarget's exporters must start with (repeatable or
    /// comma-separated); none: any URL (the global exporters are always allowed).
    #[arg(
        long = "store-export-allow",
        env = "KPROF_STORE_EXPORT_ALLOW",
        value_delimiter = ','
    )]
    pub store_export_allow: Vec<String>,
}

pub use kprof_crds::parse_duration;

/// Where artifacts are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Dir(PathBuf),
    Url(String),
}

/// Who may read, and where.
#[derive(Clone, Debug)]
pub enum Readers {
    /// Reads are served only on the TLS listener of the aggregated API, to requests the API
    /// server's front proxy makes for a user (see `frontproxy`); the upload listener refuses
    /// them. What `kprof-operator run` does.
    FrontProxy(ApiListener),
    /// Everyone who reaches the upload listener may read there too: only for in-process tests
    /// and the benchmark on 127.0.0.1 (no command line option selects it).
    Unauthenticated,
}

/// The aggregated API's listener.
#[derive(Clone, Debug)]
pub struct ApiListener {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often the front-proxy CA and the serving certificate are read again (both rotate).
    pub reload_interval: Duration,
    /// The upload listener serves TLS too, with the same certificate.
    pub tls_uploads: bool,
}

/// Everything the store needs to run.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The upload listener.
    pub listen: SocketAddr,
    pub readers: Readers,
    pub backend: Backend,
    pub max_upload_bytes: u64,
    pub allowed_uploaders: Vec<String>,
    /// Base of the artifact URLs handed back to uploaders (no trailing slash); empty: the bound
    /// address.
    pub public_url: String,
    pub gc_interval: Duration,
    pub gc_grace: Duration,
    /// How long a positive TokenReview answer is reused.
    pub token_cache_ttl: Duration,
    /// The audience upload tokens must be meant for ([`UPLOAD_AUDIENCE`]); none: whatever the
    /// API server accepts (its own audience: tests only).
    pub upload_audience: Option<String>,
    /// Push new profiles to the exporters of their ProfilingTarget (and the global ones).
    pub exporters: bool,
    /// Exporters every Profile goes to.
    pub global_exporters: Vec<kprof_crds::Exporter>,
    /// URL prefixes targets' exporters must start with; empty: any.
    pub export_allow: Vec<String>,
}

impl StoreConfig {
    /// The configuration for an operator running in `namespace`.
    pub fn from_args(args: &StoreArgs, namespace: &str) -> Self {
        let allowed = if args.store_allowed_uploader.is_empty() {
            vec![format!("system:serviceaccount:{namespace}:kprof-agent")]
        } else {
            args.store_allowed_uploader.clone()
        };
        Self {
            listen: args.store_listen,
            readers: Readers::FrontProxy(ApiListener {
                listen: args.store_api_listen,
                cert_file: args.store_tls_cert_file.clone(),
                key_file: args.store_tls_key_file.clone(),
                reload_interval: Duration::from_secs(60),
                tls_uploads: args.store_tls_uploads,
            }),
            backend: match &args.store_url {
                Some(u) => Backend::Url(u.clone()),
                None => Backend::Dir(args.store_dir.clone()),
            },
            max_upload_bytes: args.store_max_upload_bytes,
            allowed_uploaders: allowed,
            public_url: args
                .store_public_url
                .clone()
                .unwrap_or_else(|| {
                    let scheme = if args.store_tls_uploads {
                        "https"
                    } else {
                        "http"
                    };
                    format!("{scheme}://{SERVICE_NAME}.{namespace}.svc:{DEFAULT_PORT}")
                })
                .trim_end_matches('/')
                .to_string(),
            gc_interval: args.store_gc_interval,
            gc_grace: args.store_gc_grace,
            token_cache_ttl: Duration::from_secs(60),
            upload_audience: Some(args.store_upload_audience.clone()).filter(|a| !a.is_empty()),
            exporters: true,
            global_exporters: args.store_export.clone(),
            export_allow: args.store_export_allow.clone(),
        }
    }

    /// Whether uploads are served over TLS.
    pub fn tls_uploads(&self) -> bool {
        matches!(&self.readers, Readers::FrontProxy(l) if l.tls_uploads)
    }

    /// A configuration for tests and the benchmark: a directory store on `listen` that serves
    /// reads to anyone ([`Readers::Unauthenticated`]).
    pub fn for_dir(dir: impl Into<PathBuf>, listen: SocketAddr, allowed_uploader: &str) -> Self {
        Self {
            listen,
            readers: Readers::Unauthenticated,
            backend: Backend::Dir(dir.into()),
            max_upload_bytes: 64 << 20,
            allowed_uploaders: vec![allowed_uploader.to_string()],
            public_url: String::new(), // the bound address
            gc_interval: Duration::ZERO,
            gc_grace: Duration::from_secs(600),
            token_cache_ttl: Duration::from_secs(60),
            upload_audience: None,
            exporters: false,
            global_exporters: Vec::new(),
            export_allow: Vec::new(),
        }
    }
}

/// Why the store could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store configuration: {0}")]
    Config(String),
    #[error("store backend: {0}")]
    Backend(String),
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Shared state of a running store.
pub(crate) struct State {
    pub config: StoreConfig,
    pub artifacts: Artifacts,
    pub auth: auth::Authenticator,
    pub placement: placement::Placement,
    pub client: kube::Client,
    pub metrics: StoreMetrics,
    pub exporter: Option<Arc<exporter::Exporter>>,
}

/// A store, configured but not yet listening.
pub struct Store {
    state: State,
}

/// A store bound to its address.
pub struct BoundStore {
    state: Arc<State>,
    listener: tokio::net::TcpListener,
    /// The API listener, and what keeps its trust fresh.
    api: Option<(tokio::net::TcpListener, ApiRefresh)>,
}

type ApiRefresh = (
    frontproxy::TrustSource,
    tokio::sync::watch::Sender<frontproxy::Trust>,
    Duration,
);

impl Store {
    /// Open the backend; `metrics` lets the caller share the counters with its own registry.
    pub fn new(
        config: StoreConfig,
        client: kube::Client,
        metrics: StoreMetrics,
    ) -> Result<Self, StoreError> {
        let artifacts = match &config.backend {
            Backend::Dir(d) => Artifacts::local(d)?,
            Backend::Url(u) => Artifacts::from_url(u)?,
        };
        let auth = auth::Authenticator::new(
            client.clone(),
            config.allowed_uploaders.clone(),
            config.token_cache_ttl,
            config.upload_audience.clone(),
            metrics.tokenreviews.clone(),
        );
        let exporter = config.exporters.then(|| {
            Arc::new(
                exporter::Exporter::new(
                    client.clone(),
                    metrics.clone(),
                    config.global_exporters.clone(),
                )
                .with_allow_list(config.export_allow.clone()),
            )
        });
        Ok(Self {
            state: State {
                config,
                artifacts,
                auth,
                placement: placement::Placement::new(client.clone()),
                client,
                metrics,
                exporter,
            },
        })
    }

    /// Bind the listen addresses; with [`Readers::FrontProxy`], read the API server's
    /// request-header settings and the serving certificate first.
    pub async fn bind(self) -> Result<BoundStore, StoreError> {
        let mut state = self.state;
        let api = match &state.config.readers {
            Readers::Unauthenticated => None,
            Readers::FrontProxy(l) => {
                let mut source = frontproxy::TrustSource::new(
                    state.client.clone(),
                    l.cert_file.clone(),
                    l.key_file.clone(),
                );
                let trust = source.read().await?.expect("the first read builds a trust");
                let (publish, _) = tokio::sync::watch::channel(trust);
                let refresh = (source, publish, l.reload_interval);
                Some((tokio::net::TcpListener::bind(l.listen).await?, refresh))
            }
        };
        let listener = tokio::net::TcpListener::bind(state.config.listen).await?;
        if state.config.public_url.is_empty() {
            let scheme = if state.config.tls_uploads() {
                "https"
            } else {
                "http"
            };
            state.config.public_url = format!("{scheme}://{}", listener.local_addr()?);
        }
        Ok(BoundStore {
            state: Arc::new(state),
            listener,
            api,
        })
    }
}

impl BoundStore {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The aggregated API's address, with [`Readers::FrontProxy`].
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serve until `shutdown` completes (in-flight requests finish first); garbage collection
    /// runs in the background meanwhile.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StoreError> {
        let state = self.state;
        tracing::info!(addr = %self.listener.local_addr()?, backend = state.artifacts.description(), "profile store listening");
        cloud::log_system_trust();
        let gc = (state.config.gc_interval > Duration::ZERO)
            .then(|| tokio::spawn(gc::run(state.clone())));
        let exporter = state
            .exporter
            .clone()
            .map(|x| tokio::spawn(x.run(state.clone())));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let (api, refresh, upload_trust) = match self.api {
            Some((listener, (source, publish, interval))) => {
                tracing::info!(addr = ?listener.local_addr().ok(), "aggregated API {} listening (TLS)", access::API_PREFIX);
                let serve = tokio::spawn(api::serve_tls(
                    listener,
                    api::Listener::Api,
                    publish.subscribe(),
                    server::api_router(state.clone()),
                    stopped(),
                ));
                let upload_trust = state.config.tls_uploads().then(|| publish.subscribe());
                let refresh = tokio::spawn(frontproxy::keep_fresh(source, publish, interval));
                (Some(serve), Some(refresh), upload_trust)
            }
            None => (None, None, None),
        };
        tokio::spawn(async move {
            shutdown.await;
            stop_tx.send_replace(true);
        });
        let router = server::router(state.clone());
        let result = match upload_trust {
            Some(trust) => {
                let uploads = self.listener;
                api::serve_tls(uploads, api::Listener::Upload, trust, router, stopped()).await;
                Ok(())
            }
            None => {
                axum::serve(self.listener, router)
                    .with_graceful_shutdown(stopped())
                    .await
            }
        };
        for task in [gc, exporter, api, refresh].into_iter().flatten() {
            task.abort();
        }
        result.map_err(StoreError::Io)
    }
}

/// Run the store until `shutdown` completes: the entry point the operator's `run` uses.
pub async fn serve(
    config: StoreConfig,
    client: kube::Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StoreError> {
    Store::new(config, client, StoreMetrics::default())?
        .bind()
        .await?
        .run(shutdown)
        .await
}
