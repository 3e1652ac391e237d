//! The operator's HTTP endpoints: `/metrics` (OpenMetrics text), `/healthz` (the process runs)
//! and `/readyz` (caches synced when leading, or standing by). The profile store, when
//! configured, serves on its own listener (see `main.rs`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use prometheus_client::registry::Registry;

/// What `/readyz` reports.
#[derive(Default)]
pub struct Health {
    state: AtomicU8,
}

impl Health {
    const STARTING: u8 = 0;
    const STANDBY: u8 = 1;
    const LEADING: u8 = 2;

    /// Waiting for the lease: ready (a standby replica is healthy).
    pub fn set_standby(&self) {
        self.state.store(Self::STANDBY, Ordering::Relaxed);
    }
    /// Leading with synced caches.
    pub fn set_leading(&self) {
        self.state.store(Self::LEADING, Ordering::Relaxed);
    }
    /// Not (yet) able to work.
    pub fn set_starting(&self) {
        self.state.store(Self::STARTING, Ordering::Relaxed);
    }
    /// Whether this replica leads with synced caches.
    pub fn is_leading(&self) -> bool {
        self.state.load(Ordering::Relaxed) == Self::LEADING
    }
    fn describe(&self) -> Option<&'static str> {
        match self.state.load(Ordering::Relaxed) {
            Self::STANDBY => Some("standby: waiting for the leader lease\n"),
            Self::LEADING => Some("leading\n"),
            _ => None,
        }
    }
}

struct AppState {
    registry: Registry,
    health: Arc<Health>,
}

/// The router, for tests and for embedding.
pub fn router(registry: Registry, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(AppState { registry, health }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    match s.health.describe() {
        Some(text) => (StatusCode::OK, text),
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
    }
}

/// Serve until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(registry, health))
        .with_graceful_shutdown(shutdown)
        .await
}
