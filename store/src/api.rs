//! The read side of the store: the aggregated API `data.kprof.io/v1alpha1` that kube-apiserver
//! proxies to (an `APIService`), and its TLS listener.
//!
//! * `GET /apis/data.kprof.io/v1alpha1`: discovery (the subresources below).
//! * `GET …/namespaces/{ns}/profiles/{name}/pprof | flamegraph | top`: one Profile's data.
//! * `GET …/namespaces/{ns}/profiles/{name}/diff?base={ns}/{name}`: differential flame graph.
//! * `GET …/namespaces/{ns}/profiles/{name}/ui`: the Profile's web page.
//! * `GET …/namespaces/{ns}/profiles[?target=][&a=&b=]`: the namespace's web page (a diff of
//!   `a` and `b` when both are given).
//! * `GET …/artifacts/sha256:{hex}`: an artifact by digest (cluster-scoped: for admins).
//!
//! The API server has authorized the user for the URL (`get profiles/<sub>` in `{ns}`); a
//! Profile named in the query (`base`, `a`, `b`) is checked with a SubjectAccessReview.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State as AxState};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::access::{self, API_PREFIX, GROUP, Reader, VERSION};
use super::backend::{Digest, sniff_content_type};
use super::frontproxy::{FrontProxy, Peer};
use super::server::{
    bytes_response, error, load_artifact_bytes, load_pprof_bytes, load_profile, load_stacks,
    query_get, query_pairs, split_ref, title,
};
use super::{Readers, State, web};
use kprof_pprof::views::{self, TopReport};

type St = AxState<Arc<State>>;

/// The read routes, behind the reader check.
pub(crate) fn routes(state: Arc<State>) -> Router<Arc<State>> {
    let p = |s: &str| format!("{API_PREFIX}{s}");
    Router::new()
        .route(&p("/artifacts/{digest}"), get(artifact))
        .route(&p("/namespaces/{ns}/profiles"), get(web::index))
        .route(&p("/namespaces/{ns}/profiles/{name}/pprof"), get(pprof))
        .route(
            &p("/namespaces/{ns}/profiles/{name}/flamegraph"),
            get(flamegraph),
        )
        .route(&p("/namespaces/{ns}/profiles/{name}/top"), get(top))
        .route(&p("/namespaces/{ns}/profiles/{name}/summary"), get(summary))
        .route(&p("/namespaces/{ns}/profiles/{name}/diff"), get(diff))
        .route(
            &p("/namespaces/{ns}/profiles/{name}/ui"),
            get(web::profile_page),
        )
        .route_layer(middleware::from_fn_with_state(state, identify))
}

/// Discovery documents (static, served to any TLS client: the API server's availability check
/// and discovery read them).
pub(crate) fn discovery() -> Router<Arc<State>> {
    Router::new()
        .route(API_PREFIX, get(resource_list))
        .route(&format!("/apis/{GROUP}"), get(api_group))
}

/// Establish the [`Reader`]: from the front proxy's headers on a verified connection, else 401.
async fn identify(AxState(st): St, mut req: Request, next: Next) -> Response {
    let reader = match &st.config.readers {
        Readers::Unauthenticated => Reader::Anyone,
        // The connection's peer, and the request-header settings it was verified with.
        Readers::FrontProxy(_) => match (
            req.extensions().get::<Peer>(),
            req.extensions().get::<Arc<FrontProxy>>(),
        ) {
            (Some(Peer::FrontProxy), Some(fp)) => match fp.user(req.headers()) {
                Some(u) => Reader::User(u),
                None => return unauthorized("the front proxy named no user"),
            },
            (Some(Peer::Unverified(why)), _) => return unauthorized(why),
            _ => return unauthorized("not a TLS connection"),
        },
    };
    req.extensions_mut().insert(reader);
    next.run(req).await
}

fn unauthorized(why: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        format!("unauthenticated ({why}): read profiles through the Kubernetes API ({API_PREFIX})"),
    )
}

/// 403 unless `reader` may read `ns/name` (a SubjectAccessReview), 503 when that cannot be asked.
pub(crate) async fn check_read(
    st: &State,
    reader: &Reader,
    ns: &str,
    name: &str,
) -> Result<(), Response> {
    match access::may_read(&st.client, reader, ns, name).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            let who = match reader {
                Reader::User(u) => u.name.as_str(),
                Reader::Anyone => "anyone",
            };
            Err(error(
                StatusCode::FORBIDDEN,
                format!(
                    "{who} may not read Profile {ns}/{name} (needs get on profiles/{} in group {GROUP}, namespace {ns})",
                    access::READ_SUBRESOURCE
                ),
            ))
        }
        Err(e) => {
            st.metrics.error("subjectaccessreview");
            tracing::warn!(error = %e, "SubjectAccessReview failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check access right now (SubjectAccessReview failed); retry",
            ))
        }
    }
}

async fn resource_list() -> Response {
    let sub = |name: &str| {
        json!({"name": format!("profiles/{name}"), "singularName": "", "namespaced": true,
               "kind": "Profile", "verbs": ["get"]})
    };
    let mut resources: Vec<_> = ["pprof", "flamegraph", "top", "summary", "diff", "ui"]
        .into_iter()
        .map(sub)
        .collect();
    resources.push(
        json!({"name": "artifacts", "singularName": "artifact", "namespaced": false,
                          "kind": "Artifact", "verbs": ["get"]}),
    );
    json_ok(&json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("{GROUP}/{VERSION}"), "resources": resources}))
}

async fn api_group() -> Response {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json_ok(
        &json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
                    "versions": [gv], "preferredVersion": gv}),
    )
}

fn json_ok(v: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn artifact(AxState(st): St, Path(digest): Path<String>) -> Response {
    let Some(digest) = Digest::parse(&digest) else {
        return error(StatusCode::BAD_REQUEST, "expected sha256:<64 hex digits>");
    };
    match st.artifacts.get(&digest).await {
        Ok(Some(b)) => {
            st.metrics.read("artifact", b.len());
            bytes_response(sniff_content_type(&b), Some(&digest), b)
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no artifact {digest}")),
        Err(e) => {
            st.metrics.error("get");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn pprof(AxState(st): St, Path((ns, name)): Path<(String, String)>) -> Response {
    let p = match load_profile(&st, &ns, &name).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match load_pprof_bytes(&st, &p).await {
        Ok((d, b)) => {
            st.metrics.read("pprof", b.len());
            let mut r = bytes_response("application/gzip", Some(&d), b);
            if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.pb.gz\""))
            {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Err(r) => r,
    }
}

async fn flamegraph(
    AxState(st): St,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = query_pairs(&q);
    let sample_index = query_get(&q, "sampleIndex");
    if sample_index.is_none() {
        // An uploaded SVG wins when it is there.
        let p = match load_profile(&st, &ns, &name).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Some(d) = p
            .spec
            .artifacts
            .flamegraph
            .as_ref()
            .and_then(|r| r.content_digest())
            && let Ok(Some(b)) = st.artifacts.get(&d).await
        {
            st.metrics.read("flamegraph", b.len());
            return bytes_response("image/svg+xml", Some(&d), b);
        }
    }
    match load_stacks(&st, &ns, &name, sample_index.as_deref()).await {
        Ok((p, stacks)) => {
            let svg = views::flamegraph_svg(&stacks, &title(&ns, &name, &p));
            st.metrics.read("flamegraph", svg.len());
            bytes_response("image/svg+xml", None, Bytes::from(svg))
        }
        Err(r) => r,
    }
}

/// The window's figures the agent uploaded (JSON; memory and thread counts over time).
async fn summary(AxState(st): St, Path((ns, name)): Path<(String, String)>) -> Response {
    let p = match load_profile(&st, &ns, &name).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match load_artifact_bytes(&st, &p, "summary", p.spec.artifacts.summary.as_ref()).await {
        Ok((d, b)) => {
            st.metrics.read("summary", b.len());
            bytes_response("application/json", Some(&d), b)
        }
        Err(r) => r,
    }
}

async fn top(
    AxState(st): St,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = query_pairs(&q);
    let limit = query_get(&q, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(50usize);
    match load_stacks(&st, &ns, &name, query_get(&q, "sampleIndex").as_deref()).await {
        Ok((_, stacks)) => {
            let body =
                serde_json::to_string(&TopReport::new(&stacks, limit)).expect("serializable");
            st.metrics.read("top", body.len());
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(r) => r,
    }
}

/// `…/profiles/{name}/diff?base={ns}/{name}`: `name` (authorized by the API server) against
/// `base` (checked here).
async fn diff(
    AxState(st): St,
    axum::Extension(reader): axum::Extension<Reader>,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = query_pairs(&q);
    let Some(base) = query_get(&q, "base").as_deref().and_then(split_ref) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected ?base=<namespace>/<profile>",
        );
    };
    if let Err(r) = check_read(&st, &reader, &base.0, &base.1).await {
        return r;
    }
    let before = match load_stacks(&st, &base.0, &base.1, None).await {
        Ok(s) => s.1,
        Err(r) => return r,
    };
    let after = match load_stacks(&st, &ns, &name, None).await {
        Ok(s) => s.1,
        Err(r) => return r,
    };
    let svg = views::diff_svg(
        &before,
        &after,
        &format!("{}/{} → {ns}/{name}", base.0, base.1),
    );
    st.metrics.read("diff", svg.len());
    bytes_response("image/svg+xml", None, Bytes::from(svg))
}

/// Which of the store's TLS listeners a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The aggregated API: the front proxy's client certificate is verified, and each request
    /// carries the [`Peer`] it makes the connection and the settings it was verified with.
    Api,
    /// Uploads: the serving certificate only (uploaders show a token).
    Upload,
}

/// Serve `router` over TLS on `listener` until `shutdown`, with the trust in force when each
/// connection arrives.
pub(crate) async fn serve_tls(
    listener: tokio::net::TcpListener,
    which: Listener,
    trust: super::frontproxy::TrustWatch,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection on the API listener");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Each connection with the trust in force when it arrives (certificates rotate).
        let super::frontproxy::Trust {
            front_proxy,
            tls,
            upload_tls,
        } = trust.borrow().clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(match which {
            Listener::Api => tls,
            Listener::Upload => upload_tls,
        });
        let router = router.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let router = match which {
                Listener::Api => {
                    let peer = front_proxy.peer(stream.get_ref().1.peer_certificates());
                    router
                        .layer(axum::Extension(peer))
                        .layer(axum::Extension(front_proxy))
                }
                Listener::Upload => router,
            };
            let svc = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%remote, ?which, error = %e, "TLS connection ended");
            }
        });
    }
}
