//! Exporters: push every new Profile's pprof to the systems named in its ProfilingTarget's
//! `spec.exporters`: `pyroscope` (HTTP `POST /ingest?format=pprof`, multipart field `profile`)
//! and `otlp` (OTLP/HTTP profiles, converted in [`super::otlp`]). See docs/store.md.
//!
//! Global exporters (`--store-export KIND=URL`) receive every Profile of the cluster as well.
//!
//! The store watches Profiles cluster-wide; a Profile created after the store started, and at
//! most [`FRESH_FOR`] ago, is pushed once (at most once: a push that fails is counted and logged,
//! not retried, and profiles created while the store was down are not pushed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kprof_crds::{Exporter as ExporterSpec, ExporterKind, Profile, ProfilingTarget};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::{State, StoreMetrics, otlp};
use kprof_pprof::PprofError;

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}: exporter URLs must start with http:// or https://")]
    Url(String),
    #[error("reading the stored pprof: {0}")]
    Pprof(#[from] PprofError),
    #[error("{0}")]
    Http(String),
    #[error("timed out")]
    Timeout,
    #[error("HTTP {0}: {1}")]
    Status(http::StatusCode, String),
    #[error("the receiver rejected {rejected} profile(s): {message}")]
    Rejected { rejected: i64, message: String },
}

/// Profiles pushed at the same time; the watch waits for a free slot.
pub const MAX_CONCURRENT_PUSHES: usize = 8;

/// Exporters' answers are small; a larger one is cut (and then judged by its status only).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Only Profiles created this recently are pushed: after a watch relist, older ones are not
/// pushed again, and the set of pushed Profiles never needs to remember more than this.
pub const FRESH_FOR: Duration = Duration::from_secs(15 * 60);

/// Refuse what the HTTP client cannot reach.
pub(crate) fn check_url(url: &str) -> Result<(), ExportError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(ExportError::Url(url.to_string()))
    }
}

/// Parse a global exporter, `pyroscope=URL` or `otlp=URL` (`--store-export`).
pub fn parse_global(s: &str) -> Result<ExporterSpec, String> {
    let (kind, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=URL, e.g. otlp=http://collector:4318"))?;
    let kind = match kind.trim() {
        "pyroscope" => ExporterKind::Pyroscope,
        "otlp" => ExporterKind::Otlp,
        other => {
            return Err(format!(
                "{other:?}: exporter kind must be pyroscope or otlp"
            ));
        }
    };
    let url = url.trim().to_string();
    check_url(&url).map_err(|e| e.to_string())?;
    Ok(ExporterSpec { kind, url })
}

/// The exporters a Profile goes to: its target's, then the global ones not already named.
fn exporters_for(target: &[ExporterSpec], global: &[ExporterSpec]) -> Vec<ExporterSpec> {
    let mut all = target.to_vec();
    for g in global {
        if !all.iter().any(|x| x.kind == g.kind && x.url == g.url) {
            all.push(g.clone());
        }
    }
    all
}

/// The readable part of an error answer for a log line: printable characters, at most 300
/// (an OTLP error body is a protobuf `google.rpc.Status` whose message is plain text).
pub(crate) fn error_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control() || *c == ' ')
        .take(300)
        .collect()
}

/// Pushes profiles to external systems.
pub struct Exporter {
    client: Client,
    metrics: StoreMetrics,
    /// The client, or why none could be built (then every push fails with that reason).
    http: Result<reqwest::Client, String>,
    global: Vec<ExporterSpec>,
    /// Profiles pushed (uid → creation time), forgotten once older than [`FRESH_FOR`].
    seen: Mutex<HashMap<String, Timestamp>>,
    /// URL prefixes a target's exporter must start with; empty: any.
    allow: Vec<String>,
    pushes: Arc<tokio::sync::Semaphore>,
}

const BOUNDARY: &str = "kprof-boundary-6a1f0c3e9b";

impl Exporter {
    /// `global`: exporters every Profile goes to, besides its target's.
    pub fn new(client: Client, metrics: StoreMetrics, global: Vec<ExporterSpec>) -> Self {
        super::cloud::install_tls_provider();
        let http = http_client();
        Self {
            client,
            metrics,
            http,
            global,
            seen: Mutex::new(HashMap::new()),
            allow: Vec::new(),
            pushes: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PUSHES)),
        }
    }

    /// Only push to targets' exporters whose URL starts with one of `prefixes` (empty: any).
    pub fn with_allow_list(mut self, prefixes: Vec<String>) -> Self {
        self.allow = prefixes;
        self
    }

    /// Whether a target may name `url` as an exporter.
    pub fn allowed(&self, url: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|p| url.starts_with(p.as_str()))
    }

    /// Watch Profiles and push the new ones, until the task is dropped.
    pub(crate) async fn run(self: Arc<Self>, state: Arc<State>) {
        let started = Timestamp::now() - SignedDuration::from_secs(30);
        let fresh_for = SignedDuration::try_from(FRESH_FOR).expect("a small duration");
        let api: Api<Profile> = Api::all(self.client.clone());
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            let Ok(p) = ev else { continue };
            let cutoff = started.max(Timestamp::now() - fresh_for);
            let Some(created) = p.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
                continue;
            };
            if created < cutoff {
                continue;
            }
            let uid = p.metadata.uid.clone().unwrap_or_default();
            {
                let mut seen = self.seen.lock().expect("seen lock");
                if seen.insert(uid, created).is_some() {
                    continue;
                }
                if seen.len() > 1024 {
                    seen.retain(|_, c| *c >= cutoff);
                }
            }
            let Ok(slot) = self.pushes.clone().acquire_owned().await else {
                return;
            };
            let (this, state) = (self.clone(), state.clone());
            tokio::spawn(async move {
                this.export(&state, &p).await;
                drop(slot);
            });
        }
    }

    async fn export(&self, state: &State, p: &Profile) {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let targets: Api<ProfilingTarget> = Api::namespaced(self.client.clone(), &ns);
        let target_exporters = match targets.get_opt(&p.spec.target).await {
            Ok(Some(t)) => t.spec.exporters,
            Ok(None) => Vec::new(), // the target is gone: global exporters still get it
            Err(e) => {
                self.metrics.error("export");
                tracing::warn!(profile = ?p.metadata.name, error = %e, "reading the profile's target");
                return;
            }
        };
        let (target_exporters, refused): (Vec<_>, Vec<_>) = target_exporters
            .into_iter()
            .partition(|x| self.allowed(&x.url));
        for x in &refused {
            self.metrics.error("export_not_allowed");
            tracing::warn!(exporter = %x.url, profile = ?p.metadata.name, namespace = %ns, "exporter URL not in the allow-list (--store-export-allow): not pushed");
        }
        let exporters = exporters_for(&target_exporters, &self.global);
        if exporters.is_empty() {
            return;
        }
        let Some(d) = p
            .spec
            .artifacts
            .pprof
            .as_ref()
            .and_then(|r| r.content_digest())
        else {
            return;
        };
        let Ok(Some(pprof)) = state.artifacts.get(&d).await else {
            self.metrics.error("export");
            return;
        };
        for x in &exporters {
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
    pub async fn push(
        &self,
        x: &ExporterSpec,
        p: &Profile,
        pprof: Bytes,
    ) -> Result<(), ExportError> {
        let req = match x.kind {
            ExporterKind::Pyroscope => pyroscope_request(&x.url, p, pprof)?,
            ExporterKind::Otlp => otlp::request(&x.url, p, &pprof)?,
        };
        let req = reqwest::Request::try_from(req).map_err(|e| ExportError::Http(e.to_string()))?;
        let http = self
            .http
            .as_ref()
            .map_err(|e| ExportError::Http(e.clone()))?;
        let mut res = http.execute(req).await.map_err(http_error)?;
        let status = res.status();
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        match x.kind {
            ExporterKind::Otlp => otlp::check_response(status, &body),
            ExporterKind::Pyroscope if status.is_success() => Ok(()),
            ExporterKind::Pyroscope => Err(ExportError::Status(status, error_text(&body))),
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
) -> Result<http::Request<Bytes>, ExportError> {
    check_url(base)?;
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
        .body(Bytes::from(body))
        .map_err(|e| ExportError::Http(e.to_string()))
}

/// The exporters' HTTP client. Without system CA certificates (a minimal image) https cannot
/// be verified: the client is then built without roots, so http:// exporters still work and an
/// https:// push fails with a certificate error, instead of the store failing to start.
fn http_client() -> Result<reqwest::Client, String> {
    let builder = || {
        reqwest::Client::builder()
            // A redirect could send the push anywhere the operator can reach.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
    };
    builder().build().or_else(|e| {
        tracing::warn!(error = %e, "no system CA certificates: https exporters will fail (mount /etc/ssl/certs)");
        builder()
            .tls_certs_only(Vec::new())
            .build()
            .map_err(|e| format!("no HTTP client for exporters: {e}"))
    })
}

fn http_error(e: reqwest::Error) -> ExportError {
    if e.is_timeout() {
        ExportError::Timeout
    } else {
        // The whole chain: reqwest's own message is only "error sending request".
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ExportError::Http(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_exporters_parse_and_join_the_targets() {
        let otlp = parse_global("otlp=https://collector:4318").unwrap();
        assert_eq!(otlp.kind, ExporterKind::Otlp);
        assert_eq!(otlp.url, "https://collector:4318");
        let pyro = parse_global(" pyroscope = http://pyroscope:4040 ").unwrap();
        assert_eq!(pyro.kind, ExporterKind::Pyroscope);
        for bad in [
            "otlp",
            "jaeger=http://x",
            "otlp=ftp://x",
            "otlp=collector:4318",
        ] {
            assert!(parse_global(bad).is_err(), "{bad} accepted");
        }
        // The target's own exporters first; a global one it already names is not pushed twice.
        let all = exporters_for(std::slice::from_ref(&otlp), &[pyro.clone(), otlp.clone()]);
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].kind, all[1].kind),
            (ExporterKind::Otlp, ExporterKind::Pyroscope)
        );
        assert!(exporters_for(&[], &[]).is_empty());
    }

    #[tokio::test]
    async fn allow_list_by_url_prefix() {
        let client = {
            let svc = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(kube::client::Body::empty()))
            });
            kube::Client::new(svc, "default")
        };
        let any = Exporter::new(client.clone(), StoreMetrics::default(), Vec::new());
        assert!(any.allowed("http://169.254.169.254/latest"));
        let only = Exporter::new(client, StoreMetrics::default(), Vec::new())
            .with_allow_list(vec!["https://pyroscope.example.com/".into()]);
        assert!(only.allowed("https://pyroscope.example.com/tenant-a"));
        assert!(!only.allowed("https://pyroscope.example.com.evil.io/"));
        assert!(!only.allowed("http://169.254.169.254/latest"));
    }

    #[test]
    fn unsupported_urls_are_refused_before_any_request() {
        assert!(check_url("https://x").is_ok());
        let e = check_url("grpc://collector:4317").unwrap_err();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
    }
}
