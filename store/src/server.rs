//! HTTP routes of the store.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State as AxState};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use kprof_crds::{ArtifactRef, Profile};
use kube::Api;
use serde_json::json;

use super::auth::{AuthOutcome, Uploader};
use super::backend::Digest;
use super::pprof;
use kprof_crds::store_api;
use kprof_pprof::views::Stacks;

use super::{NAMESPACE_HEADER, Readers, State, api};

type St = AxState<Arc<State>>;

/// The upload listener: agents' `PUT`s, metrics and health. With [`Readers::FrontProxy`] every
/// other request is refused here (reads go through the Kubernetes API); with
/// [`Readers::Unauthenticated`] the read routes are served on this listener too.
pub(crate) fn router(state: Arc<State>) -> Router {
    let uploads = Router::new()
        .route(
            store_api::ARTIFACT_ROUTE,
            put(put_artifact).fallback(refuse_read),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::disable());
    let router = match state.config.readers {
        Readers::FrontProxy(_) => uploads.fallback(refuse_read),
        Readers::Unauthenticated => uploads
            .merge(api::discovery())
            .merge(api::routes(state.clone())),
    };
    router.with_state(state)
}

/// The aggregated API's listener (TLS, [`Readers::FrontProxy`]).
pub(crate) fn api_router(state: Arc<State>) -> Router {
    Router::new()
        .merge(api::discovery())
        .merge(api::routes(state.clone()))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

async fn refuse_read() -> Response {
    error(
        StatusCode::FORBIDDEN,
        format!(
            "this port takes uploads only: read profiles through the Kubernetes API ({})",
            super::access::API_PREFIX
        ),
    )
}

/// A plain-text error answer.
pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut msg = msg.into();
    msg.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Query parameters (`a=b&c=d`) as pairs.
pub(crate) fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn query_get(q: &[(String, String)], key: &str) -> Option<String> {
    q.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

/// A DNS-1123 label (namespace names).
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes object name (DNS-1123 subdomain): what a Profile can be called. Anything else
/// names no Profile, and is not put into a URL for the API server (where it would not parse,
/// or would name another path).
pub(crate) fn is_object_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

async fn put_artifact(
    AxState(st): St,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let m = &st.metrics;
    let authz = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let uploader = match st.auth.check(authz).await {
        Ok(AuthOutcome::Allowed(uploader)) => uploader,
        Ok(AuthOutcome::Unauthenticated(why)) => {
            m.upload("unauthenticated");
            let mut r = error(StatusCode::UNAUTHORIZED, format!("unauthenticated: {why}"));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        Ok(AuthOutcome::Forbidden(user)) => {
            m.upload("forbidden");
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "{user} may not upload artifacts (allowed: {})",
                    st.config.allowed_uploaders.join(", ")
                ),
            );
        }
        Err(e) => {
            m.upload("error");
            m.error("tokenreview");
            tracing::warn!(error = %e, "TokenReview failed");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot verify the token right now (TokenReview failed); retry",
            );
        }
    };
    let Some(digest) = Digest::parse(&digest) else {
        m.upload("bad_request");
        return error(
            StatusCode::BAD_REQUEST,
            format!("{digest:?} is not a digest of the form sha256:<64 hex digits>"),
        );
    };
    let namespace = headers
        .get(NAMESPACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !namespace.is_empty() && !is_dns_label(namespace) {
        m.upload("bad_request");
        return error(
            StatusCode::BAD_REQUEST,
            format!("{NAMESPACE_HEADER} {namespace:?} is not a namespace name"),
        );
    }
    if let Some(refused) = check_placement(&st, &uploader, namespace).await {
        return refused;
    }
    let max = st.config.max_upload_bytes;
    let too_large = |size: String| {
        m.upload("too_large");
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "artifact of {size} bytes is over the store's limit of {max} bytes (--store-max-upload-bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|l| *l > max) {
        return too_large(len.to_string());
    }
    let bytes: Bytes = match http_body_util::Limited::new(body, max as usize)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large("more than that".to_string());
        }
        Err(e) => {
            m.upload("bad_request");
            return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
    };
    let actual = Digest::of(&bytes);
    if actual != digest {
        m.upload("bad_digest");
        return error(
            StatusCode::BAD_REQUEST,
            format!("digest mismatch: the URL names {digest} but the body is {actual}"),
        );
    }
    let url = digest.url(&st.config.public_url);
    let size = bytes.len();
    let status = match st.artifacts.exists(&digest).await {
        Ok(true) => {
            m.upload("exists");
            StatusCode::OK
        }
        Ok(false) => match st.artifacts.put(&digest, bytes.clone()).await {
            Ok(()) => {
                m.upload("created");
                StatusCode::CREATED
            }
            Err(e) => {
                m.upload("error");
                m.error("put");
                tracing::warn!(error = %e, %digest, "storing an artifact failed");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storing the artifact failed: {e}"),
                );
            }
        },
        Err(e) => {
            m.upload("error");
            m.error("head");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("store backend: {e}"),
            );
        }
    };
    m.upload_bytes.inc_by(size as u64);
    tracing::debug!(%digest, size, namespace, created = status == StatusCode::CREATED, "artifact upload");
    json_response(
        status,
        &json!({"digest": digest.to_string(), "size": size, "url": url}),
    )
}

/// An uploader whose token is bound to a pod uploads only for namespaces with a pod on that
/// pod's node: an agent cannot upload in the name of another node's pods. Tokens bound to no
/// pod (minted with TokenRequest by whoever may) name no node and are not limited.
async fn check_placement(st: &State, uploader: &Uploader, namespace: &str) -> Option<Response> {
    let node = uploader.node.as_deref()?;
    let m = &st.metrics;
    if namespace.is_empty() {
        m.upload("bad_request");
        return Some(error(
            StatusCode::BAD_REQUEST,
            format!("{NAMESPACE_HEADER} is required of an uploader bound to node {node}"),
        ));
    }
    match st.placement.runs_pods_on(namespace, node).await {
        Ok(true) => None,
        Ok(false) => {
            m.upload("forbidden");
            Some(error(
                StatusCode::FORBIDDEN,
                format!(
                    "{} on node {node} may not upload for namespace {namespace}: it runs no pod there",
                    uploader.user
                ),
            ))
        }
        Err(e) => {
            m.upload("error");
            m.error("placement");
            tracing::warn!(error = %e, node, namespace, "listing the node's pods failed");
            Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check the uploader's node right now (listing pods failed); retry",
            ))
        }
    }
}

pub(crate) fn bytes_response(
    content_type: &str,
    digest: Option<&Digest>,
    bytes: Bytes,
) -> Response {
    let mut r = Response::new(Body::from(bytes));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    // The API server's origin (or `kubectl proxy`'s) carries the user's credentials: keep the
    // browser from sniffing, and SVG scripts (inferno's search and zoom) in a sandbox.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if content_type.starts_with("image/svg") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox allow-scripts"),
        );
    }
    if let Some(d) = digest {
        if let Ok(v) = HeaderValue::from_str(&format!("\"{d}\"")) {
            h.insert(header::ETAG, v);
        }
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=31536000, immutable"),
        );
    }
    r
}

/// The Profile `ns/name`, read with the store's own credentials.
pub(crate) async fn load_profile(st: &State, ns: &str, name: &str) -> Result<Profile, Response> {
    if !is_dns_label(ns) || !is_object_name(name) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no Profile {ns:?}/{name:?}"),
        ));
    }
    let api: Api<Profile> = Api::namespaced(st.client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            format!("no Profile {ns}/{name}"),
        )),
        Err(e) => {
            st.metrics.error("get_profile");
            Err(error(
                StatusCode::BAD_GATEWAY,
                format!("reading Profile {ns}/{name}: {e}"),
            ))
        }
    }
}

/// The raw pprof bytes of a Profile.
pub(crate) async fn load_pprof_bytes(st: &State, p: &Profile) -> Result<(Digest, Bytes), Response> {
    load_artifact_bytes(st, p, "pprof", p.spec.artifacts.pprof.as_ref()).await
}

/// The bytes of the artifact `what` of a Profile, referenced by `r`.
pub(crate) async fn load_artifact_bytes(
    st: &State,
    p: &Profile,
    what: &str,
    r: Option<&ArtifactRef>,
) -> Result<(Digest, Bytes), Response> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let Some(r) = r else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("Profile {name} has no {what} artifact"),
        ));
    };
    let Some(d) = r.content_digest() else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("Profile {name}: the {what} artifact has no sha256 digest"),
        ));
    };
    match st.artifacts.get(&d).await {
        Ok(Some(b)) => Ok((d, b)),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            format!("Profile {name}: artifact {d} is not in the store"),
        )),
        Err(e) => {
            st.metrics.error("get");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
    }
}

/// A Profile's stacks for the value chosen by `sampleIndex` (default: the profile's default).
pub(crate) async fn load_stacks(
    st: &State,
    ns: &str,
    name: &str,
    sample_index: Option<&str>,
) -> Result<(Profile, Stacks), Response> {
    let p = load_profile(st, ns, name).await?;
    let (_, bytes) = load_pprof_bytes(st, &p).await?;
    let prof = pprof::Profile::decode_bytes(&bytes).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{ns}/{name}: {e}"),
        )
    })?;
    let idx = prof.value_index(sample_index).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "no sample type {sample_index:?}; the profile has {:?}",
                prof.sample_types()
            ),
        )
    })?;
    Ok((p, Stacks::from_profile(&prof, idx)))
}

pub(crate) fn title(ns: &str, name: &str, p: &Profile) -> String {
    format!(
        "{ns}/{name}: {} of {}/{} ({})",
        p.spec.profile_type, p.spec.pod, p.spec.container, p.spec.runtime
    )
}

/// Split `ns/name`.
pub(crate) fn split_ref(s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    (is_dns_label(ns) && is_object_name(name)).then(|| (ns.to_string(), name.to_string()))
}

async fn metrics(AxState(st): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing (store_routes): `…/diff?base=bank/%60` (a backquote, or any name that is not
    /// an object name) went into the URL of the store's GET of the Profile, which did not
    /// parse: a 502 as if the API server had failed. Such a name is refused before (400 for
    /// `base`, 404 for a Profile of the path, see `tests/store_api.rs`).
    #[test]
    fn only_object_names_are_profile_refs() {
        assert_eq!(
            split_ref("shop/checkout-cpu-1.a"),
            Some(("shop".into(), "checkout-cpu-1.a".into()))
        );
        for bad in [
            "bank/`",
            "bank/..",
            "bank/a..b",
            "bank/-a",
            "bank/a-",
            "bank/A",
            "bank/a?b=c",
            "bank/a b",
            "bank/a%2f",
            "bank/",
            "Bank/a",
            "bank/a/b",
        ] {
            assert_eq!(split_ref(bad), None, "{bad}");
        }
        assert!(is_object_name(&"a".repeat(253)));
        assert!(!is_object_name(&"a".repeat(254)));
    }
}
