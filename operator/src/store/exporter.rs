//! Exporters: push every new Profile's pprof to the systems named in its ProfilingTarget's
//! `spec.exporters`. Only `pyroscope` (HTTP `POST /ingest?format=pprof`, multipart field
//! `profile`) is implemented; `otlp` is logged as unsupported (see docs/store.md).
//!
//! The store watches Profiles cluster-wide; a Profile created after the store started is pushed
//! once (at most once: a push that fails is counted and logged, not retried, and profiles created
//! while the store was down are not pushed).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kprof_crds::{Exporter as ExporterSpec, ExporterKind, Profile, ProfilingTarget};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::backend::Digest;
use super::{State, StoreMetrics};

/// Pushes profiles to external systems.
pub struct Exporter {
    client: Client,
    metrics: StoreMetrics,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    seen: Mutex<HashSet<String>>,
}

const BOUNDARY: &str = "kprof-boundary-6a1f0c3e9b";

impl Exporter {
    pub fn new(client: Client, metrics: StoreMetrics) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            client,
            metrics,
            http: HttpClient::builder(TokioExecutor::new()).build(conn),
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Watch Profiles and push the new ones, until the task is dropped.
    pub(crate) async fn run(self: Arc<Self>, state: Arc<State>) {
        let started =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(30);
        let api: Api<Profile> = Api::all(self.client.clone());
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            let Ok(p) = ev else { continue };
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            if created.is_none_or(|c| c < started) {
                continue;
            }
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if !self.seen.lock().expect("seen lock").insert(uid) {
                continue;
            }
            let (this, state) = (self.clone(), state.clone());
            tokio::spawn(async move { this.export(&state, &p).await });
        }
    }

    async fn export(&self, state: &State, p: &Profile) {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let targets: Api<ProfilingTarget> = Api::namespaced(self.client.clone(), &ns);
        let Ok(Some(target)) = targets.get_opt(&p.spec.target).await else {
            return;
        };
        if target.spec.exporters.is_empty() {
            return;
        }
        let Some(d) = p
            .spec
            .artifacts
            .pprof
            .as_ref()
            .and_then(|r| Digest::parse(&r.digest).or_else(|| Digest::from_url(&r.url)))
        else {
            return;
        };
        let Ok(Some(pprof)) = state.artifacts.get(&d).await else {
            self.metrics.error("export");
            return;
        };
        for x in &target.spec.exporters {
            let result = self.push(x, p, pprof.clone()).await;
            match result {
                Ok(()) => self.metrics.upload("exported"),
                Err(e) => {
                    self.metrics.error("export");
                    tracing::warn!(exporter = %x.url, profile = ?p.metadata.name, error = %e, "exporting a profile failed");
                }
            }
        }
    }

    /// Push one profile to one exporter.
    pub async fn push(&self, x: &ExporterSpec, p: &Profile, pprof: Bytes) -> Result<(), String> {
        let req = match x.kind {
            ExporterKind::Pyroscope => pyroscope_request(&x.url, p, pprof)?,
            ExporterKind::Otlp => return Err("otlp export is not implemented yet".into()),
        };
        let res = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", res.status()))
        }
    }
}

/// The Pyroscope application name and labels of a Profile:
/// `kprof.<type>{namespace="…",target="…",pod="…",container="…",node="…"}`.
pub fn pyroscope_name(p: &Profile) -> String {
    let s = &p.spec;
    let ns = p.metadata.namespace.as_deref().unwrap_or_default();
    format!(
        "kprof.{}{{namespace={},target={},pod={},container={},node={}}}",
        s.profile_type, ns, s.target, s.pod, s.container, s.node
    )
}

/// `POST <url>/ingest?name=…&from=…&until=…&format=pprof&sampleRate=…&spyName=kprof` with the
/// pprof as the multipart field `profile`.
pub fn pyroscope_request(
    base: &str,
    p: &Profile,
    pprof: Bytes,
) -> Result<http::Request<Full<Bytes>>, String> {
    if !base.starts_with("http://") {
        return Err(format!(
            "{base}: only http:// exporter URLs are supported by this build"
        ));
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("name", &pyroscope_name(p))
        .append_pair("from", &p.spec.window_start.0.as_second().to_string())
        .append_pair("until", &p.spec.window_end.0.as_second().to_string())
        .append_pair("format", "pprof")
        .append_pair("sampleRate", &p.spec.sample_hz.to_string())
        .append_pair("spyName", "kprof")
        .finish();
    let mut body = Vec::with_capacity(pprof.len() + 256);
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"profile\"; filename=\"profile.pprof\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&pprof);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    http::Request::post(format!("{}/ingest?{query}", base.trim_end_matches('/')))
        .header(
            http::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())
}
