//! Shared helpers of the store tests: a fake API server (TokenReview, Profiles,
//! ProfilingTargets) behind a kube `Client`, a store on 127.0.0.1 with a temp dir, and a
//! tiny HTTP client; `backend`: the round trip every object-store backend passes.
#![allow(dead_code)]

pub mod backend;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kprof_crds::{ArtifactRef, Artifacts, Profile, ProfileSpec, ProfileType};
pub use kprof_store::Digest;
use kprof_store::{self as store, StoreConfig, StoreMetrics};
use serde_json::json;

pub const AGENT: &str = "system:serviceaccount:kprof-system:kprof-agent";
pub const AGENT_TOKEN: &str = "agent-token";
pub const OTHER_TOKEN: &str = "other-token";
/// The agent's ordinary ServiceAccount token: meant for the API server, not the store.
pub const AGENT_API_TOKEN: &str = "agent-api-token";
/// The agent's tokens as the kubelet projects them: bound to its pod, and so to a node.
pub const NODE_A_TOKEN: &str = "agent-token-node-a";
pub const NODE_B_TOKEN: &str = "agent-token-node-b";
/// The audiences each token is meant for (as the API server knows them).
fn audiences_of(token: &str) -> &'static [&'static str] {
    match token {
        AGENT_API_TOKEN => &["https://kubernetes.default.svc"],
        _ => &[kprof_crds::store_api::UPLOAD_AUDIENCE],
    }
}

/// What the fake API server knows.
#[derive(Default)]
pub struct FakeApi {
    pub profiles: Vec<Profile>,
    pub tokenreviews: usize,
    /// `kube-system/extension-apiserver-authentication` data (the front proxy's CA and names).
    pub auth_configmap: serde_json::Value,
    /// (user, namespace) pairs a SubjectAccessReview for reading profiles allows.
    pub readers: Vec<(String, String)>,
    pub subjectaccessreviews: usize,
    /// (namespace, node) of the pods the cluster runs.
    pub pods: Vec<(String, String)>,
    pub pod_lists: usize,
}

pub type Shared = Arc<Mutex<FakeApi>>;

fn respond(status: StatusCode, v: serde_json::Value) -> Response<kube::client::Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(v.to_string().into_bytes()))
        .unwrap()
}

fn not_found(what: &str) -> Response<kube::client::Body> {
    respond(
        StatusCode::NOT_FOUND,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":format!("{what} not found"),"reason":"NotFound","code":404}),
    )
}

async fn handle(api: Shared, req: Request<kube::client::Body>) -> Response<kube::client::Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            api.lock().unwrap().tokenreviews += 1;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let token = v["spec"]["token"].as_str().unwrap_or_default();
            // As the API server does: asked for audiences, the token must be meant for one of
            // them, and the answer names those it is meant for.
            let asked: Option<Vec<&str>> = v["spec"]["audiences"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect());
            let good: Vec<&str> = match &asked {
                Some(asked) => audiences_of(token)
                    .iter()
                    .copied()
                    .filter(|a| asked.contains(a))
                    .collect(),
                None => audiences_of(token).to_vec(),
            };
            let node = match token {
                NODE_A_TOKEN => Some("node-a"),
                NODE_B_TOKEN => Some("node-b"),
                _ => None,
            };
            let user = match token {
                AGENT_TOKEN | AGENT_API_TOKEN | NODE_A_TOKEN | NODE_B_TOKEN => Some(AGENT),
                OTHER_TOKEN => Some("system:serviceaccount:shop:default"),
                _ => None,
            };
            let status = match user {
                Some(_) if good.is_empty() => {
                    json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
                }
                Some(u) => {
                    let extra =
                        node.map(|n| json!({"authentication.kubernetes.io/node-name": [n]}));
                    json!({"authenticated": true, "user": {"username": u, "extra": extra}, "audiences": good})
                }
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            respond(
                StatusCode::CREATED,
                json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","metadata":{},"spec":v["spec"],"status":status}),
            )
        }
        (
            Method::GET,
            [
                "api",
                "v1",
                "namespaces",
                "kube-system",
                "configmaps",
                "extension-apiserver-authentication",
            ],
        ) => {
            let data = api.lock().unwrap().auth_configmap.clone();
            respond(
                StatusCode::OK,
                json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"extension-apiserver-authentication","namespace":"kube-system"},"data":data}),
            )
        }
        (Method::POST, ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let spec = &v["spec"];
            let ra = &spec["resourceAttributes"];
            let mut api = api.lock().unwrap();
            api.subjectaccessreviews += 1;
            let allowed = ra["group"] == "data.kprof.io"
                && ra["resource"] == "profiles"
                && ra["subresource"] == "pprof"
                && ra["verb"] == "get"
                && api.readers.iter().any(|(u, ns)| {
                    spec["user"].as_str() == Some(u) && ra["namespace"].as_str() == Some(ns)
                });
            respond(
                StatusCode::CREATED,
                json!({"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","metadata":{},"spec":spec,"status":{"allowed":allowed}}),
            )
        }
        (Method::GET, ["apis", "kprof.io", "v1alpha1", "profiles"])
        | (Method::GET, ["apis", "kprof.io", "v1alpha1", "namespaces", _, "profiles"]) => {
            let ns = parts.get(4).copied();
            let items: Vec<Profile> = api
                .lock()
                .unwrap()
                .profiles
                .iter()
                .filter(|p| ns.is_none_or(|n| p.metadata.namespace.as_deref() == Some(n)))
                .cloned()
                .collect();
            respond(
                StatusCode::OK,
                json!({"apiVersion":"kprof.io/v1alpha1","kind":"ProfileList","metadata":{"resourceVersion":"1"},"items":items}),
            )
        }
        (
            Method::GET,
            [
                "apis",
                "kprof.io",
                "v1alpha1",
                "namespaces",
                ns,
                "profiles",
                name,
            ],
        ) => {
            let found = api
                .lock()
                .unwrap()
                .profiles
                .iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(*ns)
                        && p.metadata.name.as_deref() == Some(*name)
                })
                .cloned();
            match found {
                Some(p) => respond(StatusCode::OK, serde_json::to_value(p).unwrap()),
                None => not_found(&format!("profiles.kprof.io \"{name}\"")),
            }
        }
        (Method::GET, ["apis", "kprof.io", "v1alpha1", "profilingtargets"])
        | (
            Method::GET,
            [
                "apis",
                "kprof.io",
                "v1alpha1",
                "namespaces",
                _,
                "profilingtargets",
            ],
        ) => respond(
            StatusCode::OK,
            json!({"apiVersion":"kprof.io/v1alpha1","kind":"ProfilingTargetList","metadata":{"resourceVersion":"1"},"items":[]}),
        ),
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            // Only what the store asks: the pods of a namespace on one node.
            let node = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "fieldSelector")
                .and_then(|(_, v)| v.strip_prefix("spec.nodeName=").map(str::to_string));
            let mut api = api.lock().unwrap();
            api.pod_lists += 1;
            let items: Vec<serde_json::Value> = api
                .pods
                .iter()
                .enumerate()
                .filter(|(_, (n, on))| n == ns && node.as_deref().is_none_or(|want| want == on))
                .map(|(i, _)| json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata","metadata":{"name":format!("pod-{i}"),"namespace":ns}}))
                .collect();
            respond(
                StatusCode::OK,
                json!({"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadataList","metadata":{"resourceVersion":"1"},"items":items}),
            )
        }
        (m, _) => not_found(&format!("{m} {path}")),
    }
}

/// A kube client whose API server is [`FakeApi`].
pub fn fake_client(api: Shared) -> kube::Client {
    let svc = tower::service_fn(move |req| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(handle(api, req).await) }
    });
    kube::Client::new(svc, "default")
}

/// A running store.
pub struct TestStore {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub api: Shared,
    pub metrics: StoreMetrics,
    pub client: kube::Client,
    /// The aggregated API's TLS listener ([`store::Readers::FrontProxy`]).
    pub api_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl TestStore {
    pub async fn start(max_upload: u64) -> Self {
        Self::start_with(max_upload, store::Readers::Unauthenticated, Arc::default()).await
    }

    /// A store whose readers are `readers`, against the fake API server `api`.
    pub async fn start_with(max_upload: u64, readers: store::Readers, api: Shared) -> Self {
        Self::start_configured(api, |config| {
            config.max_upload_bytes = max_upload;
            config.readers = readers;
        })
        .await
    }

    /// A directory store configured by `configure`, against the fake API server `api`.
    pub async fn start_configured(api: Shared, configure: impl FnOnce(&mut StoreConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let client = fake_client(api.clone());
        let mut config = StoreConfig::for_dir(
            dir.path().join("store"),
            "127.0.0.1:0".parse().unwrap(),
            AGENT,
        );
        configure(&mut config);
        let metrics = StoreMetrics::default();
        let bound = store::Store::new(config, client.clone(), metrics.clone())
            .unwrap()
            .bind()
            .await
            .unwrap();
        let addr = bound.local_addr();
        let api_addr = bound.api_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            dir,
            api,
            metrics,
            client,
            api_addr,
            stop: Some(tx),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Upload as the agent; (status, body).
    pub async fn upload(&self, bytes: &[u8], token: Option<&str>) -> (StatusCode, String) {
        let d = Digest::of(bytes);
        let (s, _, b) = put(&self.url(&format!("/v1/artifacts/{d}")), bytes, token).await;
        (s, String::from_utf8_lossy(&b).into_owned())
    }

    /// Add a Profile `ns/name` pointing at the given artifacts.
    pub fn add_profile(&self, ns: &str, name: &str, pprof: Option<&[u8]>, svg: Option<&[u8]>) {
        let r = |b: &[u8]| {
            let d = Digest::of(b);
            ArtifactRef {
                url: format!("http://kprof-store.kprof-system.svc:8090/v1/artifacts/{d}"),
                digest: d.to_string(),
                size_bytes: b.len() as u64,
            }
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut p = Profile::new(
            name,
            ProfileSpec {
                target: "checkout".into(),
                pod: "checkout-7d9f".into(),
                container: "app".into(),
                node: "vm".into(),
                pids: vec![42],
                runtime: "cpython 3.12.1".into(),
                profile_type: ProfileType::Cpu,
                window_start: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    now - k8s_openapi::jiff::SignedDuration::from_secs(30),
                ),
                window_end: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
                sample_hz: 99,
                samples: 10,
                lost_samples: 0,
                cpu_cores: 0.1,
                threads: 1,
                top: "app.work 60%".into(),
                top_functions: vec![],
                artifacts: Artifacts {
                    pprof: pprof.map(r),
                    flamegraph: svg.map(r),
                    summary: None,
                },
                time: None,
                thread_summary: None,
                memory_summary: None,
                warnings: vec![],
            },
        );
        p.metadata.namespace = Some(ns.to_string());
        p.metadata.uid = Some(format!("uid-{ns}-{name}"));
        p.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        self.api.lock().unwrap().profiles.push(p);
    }
}

fn http() -> HttpClient<HttpConnector, Full<Bytes>> {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    method: Method,
    url: &str,
    body: &[u8],
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    request_in(method, url, body, token, Some("shop")).await
}

/// A request naming `namespace` (or none) in the uploads' namespace header.
pub async fn request_in(
    method: Method,
    url: &str,
    body: &[u8],
    token: Option<&str>,
    namespace: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/octet-stream")];
    headers.extend(namespace.map(|ns| ("x-kprof-namespace", ns)));
    headers.extend(bearer.as_deref().map(|b| ("authorization", b)));
    send(method, url, &headers, Bytes::copy_from_slice(body)).await
}

/// Any request: (status, headers, body), or the error when nothing answers.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, http::HeaderMap, Bytes), hyper_util::client::legacy::Error> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = http().request(b.body(Full::new(body)).unwrap()).await?;
    let (parts, body) = res.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    ))
}

/// Any request: (status, headers, body).
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, http::HeaderMap, Bytes) {
    try_send(method, url, headers, body).await.unwrap()
}

pub async fn put(
    url: &str,
    body: &[u8],
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    request(Method::PUT, url, body, token).await
}

pub async fn get(url: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    request(Method::GET, url, b"", None).await
}

/// GET with extra headers; (status, headers, body as text).
pub async fn request_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, String) {
    let (status, headers, body) = send(Method::GET, url, headers, Bytes::new()).await;
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// A realistic pprof: a Python service with a hot path.
pub fn sample_pprof(hot: i64, idle: i64) -> Vec<u8> {
    store::pprof::synthetic(
        &[
            (
                &[
                    "python",
                    "main",
                    "app.serve",
                    "app.handle",
                    "checkout.compute_total",
                ],
                hot,
            ),
            (
                &["python", "main", "app.serve", "app.handle", "json.dumps"],
                3,
            ),
            (&["python", "main", "app.serve", "selectors.select"], idle),
        ],
        1_700_000_000_000_000_000,
        30_000_000_000,
    )
    .encode_gzip()
}

/// A server binary cached by `e2e/testbed/build-*.sh`: `$ENV_VAR`, else the newest
/// `$KPROF_CACHE/<dir>/<version>/bin/<name>`.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn cached_binary(env_var: &str, dir: &str, name: &str) -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Some(std::path::PathBuf::from(p));
    }
    let cache = std::env::var("KPROF_CACHE").unwrap_or_else(|_| "/var/cache/kprof".into());
    let mut found: Vec<std::path::PathBuf> =
        std::fs::read_dir(std::path::PathBuf::from(cache).join(dir))
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin").join(name)))
            .filter(|p| p.is_file())
            .collect();
    found.sort();
    found.pop()
}

/// A free TCP port on 127.0.0.1.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
