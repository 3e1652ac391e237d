//! The store as `kprof-operator run` configures it ([`Readers::FrontProxy`]), in-process against
//! the fake API server: reads only over TLS from a client certificate of the front-proxy CA with
//! an allowed name and a user header; every read route and the web page refused (401) without
//! one; the upload port refuses reads (403); the other side of a diff checked with a
//! SubjectAccessReview; a rotated front-proxy CA and serving certificate taken without a
//! restart. The real API server in front of it is `e2e/tests/tenancy.rs`.

mod store_common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use kprof_store::{ApiListener, Readers};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use store_common::*;

const API: &str = "/apis/data.kprof.io/v1alpha1";

struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: Issuer::new(p, key),
    }
}

/// A certificate signed by `ca`: (chain, key).
fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> Leaf {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        cert.pem(),
        key.serialize_pem(),
    )
}

/// GET `path` over TLS, optionally with a client certificate and headers; (status, body).
async fn tls_get(
    addr: std::net::SocketAddr,
    serving_ca: &Ca,
    client: Option<&Leaf>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    tls_request(addr, serving_ca, client, "GET", path, headers, Bytes::new()).await
}

/// A request over TLS to the store, naming it `kprof-api.kprof-system.svc`; (status, body).
async fn tls_request(
    addr: std::net::SocketAddr,
    serving_ca: &Ca,
    client: Option<&Leaf>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(serving_ca.cert.der().clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((c, k, _, _)) => b.with_client_auth_cert(c.clone(), k.clone_key()).unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from("kprof-api.kprof-system.svc").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kprof-api");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = sender
        .send_request(req.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn reads_only_from_the_front_proxy_for_a_user() {
    let front_proxy_ca = ca("front-proxy-ca");
    let proxy = leaf(&front_proxy_ca, "front-proxy-client", &[]);
    let impostor_name = leaf(&front_proxy_ca, "someone-else", &[]);
    let other_ca = ca("other-ca");
    let impostor_ca = leaf(&other_ca, "front-proxy-client", &[]);
    let serving_ca = Arc::new(ca("kprof-api-ca"));
    let serving = leaf(&serving_ca, "kprof-api", &["kprof-api.kprof-system.svc"]);
    let tls_dir = tempfile::tempdir().unwrap();
    write_serving(tls_dir.path(), &serving);

    let api: Shared = Arc::new(Mutex::new(FakeApi {
        auth_configmap: json!({
            "requestheader-client-ca-file": front_proxy_ca.cert.pem(),
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
            "requestheader-username-headers": "[\"X-Remote-User\"]",
            "requestheader-group-headers": "[\"X-Remote-Group\"]",
            "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
        }),
        readers: vec![("alice".into(), "shop".into())],
        ..Default::default()
    }));
    let s = TestStore::start_with(
        1 << 20,
        front_proxy(tls_dir.path(), std::time::Duration::from_secs(60), false),
        api.clone(),
    )
    .await;
    let api_addr = s.api_addr.expect("the API listener");
    let pprof = sample_pprof(60, 20);
    let (status, body) = s.upload(&pprof, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    s.add_profile("shop", "p1", Some(&pprof), None);
    s.add_profile("shop", "p2", Some(&pprof), None);
    s.add_profile("bank", "b1", Some(&pprof), None);
    let d = store_common::Digest::of(&pprof);

    let reads = [
        format!("{API}/artifacts/{d}"),
        format!("{API}/namespaces/shop/profiles"),
        format!("{API}/namespaces/shop/profiles?a=shop/p1&b=shop/p2"),
        format!("{API}/namespaces/shop/profiles/p1/pprof"),
        format!("{API}/namespaces/shop/profiles/p1/flamegraph"),
        format!("{API}/namespaces/shop/profiles/p1/top"),
        format!("{API}/namespaces/shop/profiles/p1/ui"),
        format!("{API}/namespaces/shop/profiles/p2/diff?base=shop/p1"),
    ];
    let alice = [("X-Remote-User", "alice"), ("X-Remote-Group", "dev")];
    for path in &reads {
        // Refused on the upload port, whatever the headers say.
        let (status, _, body) = request_with(&s.url(path), &alice).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "upload port {path}: {body}");
        // No client certificate, one from another CA, or a name that is not allowed: 401.
        let (status, body) = tls_get(api_addr, &serving_ca, None, path, &alice).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no cert {path}: {body}");
        let (status, body) =
            tls_get(api_addr, &serving_ca, Some(&impostor_name), path, &alice).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "wrong name {path}: {body}"
        );
        // The proxy, but no user named.
        let (status, body) = tls_get(api_addr, &serving_ca, Some(&proxy), path, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no user {path}: {body}");
        // The proxy for alice.
        let (status, body) = tls_get(api_addr, &serving_ca, Some(&proxy), path, &alice).await;
        assert_eq!(status, StatusCode::OK, "front proxy {path}: {body}");
    }
    // A certificate of another CA does not even complete the handshake as a client identity:
    // rustls refuses it, so the connection fails or the request is refused.
    let roots = serving_ca.clone();
    let refused = tokio::spawn(async move {
        tls_get(
            api_addr,
            &roots,
            Some(&impostor_ca),
            &format!("{API}/namespaces/shop/profiles/p1/pprof"),
            &[],
        )
        .await
    })
    .await;
    assert!(
        refused.is_err() || refused.as_ref().unwrap().0 != StatusCode::OK,
        "{refused:?}"
    );

    // A diff whose other side is in a namespace alice may not read: 403 from kprof's own check.
    let sars = api.lock().unwrap().subjectaccessreviews;
    let (status, body) = tls_get(
        api_addr,
        &serving_ca,
        Some(&proxy),
        &format!("{API}/namespaces/shop/profiles/p1/diff?base=bank/b1"),
        &alice,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("alice may not read Profile bank/b1"),
        "{body}"
    );
    let (status, body) = tls_get(
        api_addr,
        &serving_ca,
        Some(&proxy),
        &format!("{API}/namespaces/shop/profiles?a=bank/b1&b=shop/p1"),
        &alice,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(api.lock().unwrap().subjectaccessreviews >= sars + 2);
    // Allowed once the API server says so.
    api.lock()
        .unwrap()
        .readers
        .push(("alice".into(), "bank".into()));
    let (status, body) = tls_get(
        api_addr,
        &serving_ca,
        Some(&proxy),
        &format!("{API}/namespaces/shop/profiles/p1/diff?base=bank/b1"),
        &alice,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<svg"), "{body}");

    // Discovery is served to the API server without a user.
    let (status, body) = tls_get(api_addr, &serving_ca, None, API, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["groupVersion"], "data.kprof.io/v1alpha1");
    assert!(
        v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "profiles/pprof")
    );
}

#[tokio::test]
async fn a_rotated_front_proxy_ca_and_serving_certificate_are_taken_without_a_restart() {
    let auth = |ca: &Ca| {
        json!({
            "requestheader-client-ca-file": ca.cert.pem(),
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
        })
    };
    let (old_ca, new_ca) = (ca("front-proxy-ca-1"), ca("front-proxy-ca-2"));
    let (old_proxy, new_proxy) = (
        leak(leaf(&old_ca, "front-proxy-client", &[])),
        leak(leaf(&new_ca, "front-proxy-client", &[])),
    );
    let (old_serving_ca, new_serving_ca) = (ca("kprof-api-ca-1"), ca("kprof-api-ca-2"));
    let serving = |ca: &Ca| leaf(ca, "kprof-api", &["kprof-api.kprof-system.svc"]);
    let tls_dir = tempfile::tempdir().unwrap();
    write_serving(tls_dir.path(), &serving(&old_serving_ca));
    let api: Shared = Arc::new(Mutex::new(FakeApi {
        auth_configmap: auth(&old_ca),
        readers: vec![("alice".into(), "shop".into())],
        ..Default::default()
    }));
    let s = TestStore::start_with(
        1 << 20,
        front_proxy(tls_dir.path(), std::time::Duration::from_millis(100), false),
        api.clone(),
    )
    .await;
    let addr = s.api_addr.expect("the API listener");
    let (old_serving_ca, new_serving_ca) = (leak(old_serving_ca), leak(new_serving_ca));
    let get = |serving_ca, proxy| rotated_get(addr, serving_ca, proxy);
    assert_eq!(get(old_serving_ca, old_proxy).await, StatusCode::OK);
    assert_ne!(get(old_serving_ca, new_proxy).await, StatusCode::OK);

    // Both rotate: the API server's front-proxy CA, and the Secret behind the serving files.
    api.lock().unwrap().auth_configmap = auth(&new_ca);
    write_serving(tls_dir.path(), &serving(new_serving_ca));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(new_serving_ca, new_proxy).await != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated CA and certificate were not taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The old front-proxy certificate no longer passes, and the old serving certificate is gone.
    assert_ne!(get(new_serving_ca, old_proxy).await, StatusCode::OK);
    assert_ne!(get(old_serving_ca, new_proxy).await, StatusCode::OK);
}

/// The store's readers as `kprof-operator run` configures them, with the serving certificate in
/// `dir` (see [`write_serving`]).
fn front_proxy(
    dir: &std::path::Path,
    reload_interval: std::time::Duration,
    tls_uploads: bool,
) -> Readers {
    Readers::FrontProxy(ApiListener {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        reload_interval,
        tls_uploads,
    })
}

/// The serving certificate and key as the Secret's files in `dir`.
fn write_serving(dir: &std::path::Path, cert: &Leaf) {
    std::fs::write(dir.join("tls.crt"), &cert.2).unwrap();
    std::fs::write(dir.join("tls.key"), &cert.3).unwrap();
}

type Leaf = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    String,
    String,
);

fn leak<T>(t: T) -> &'static T {
    Box::leak(Box::new(t))
}

/// A user's read through `proxy`, trusting `serving_ca`: its status, or 502 when a side
/// refused the handshake.
async fn rotated_get(
    addr: std::net::SocketAddr,
    serving_ca: &'static Ca,
    proxy: &'static Leaf,
) -> StatusCode {
    let path = format!("{API}/namespaces/shop/profiles");
    tokio::spawn(async move {
        tls_get(
            addr,
            serving_ca,
            Some(proxy),
            &path,
            &[("X-Remote-User", "alice")],
        )
        .await
    })
    .await
    .map(|(status, _)| status)
    .unwrap_or(StatusCode::BAD_GATEWAY)
}

#[tokio::test]
async fn uploads_go_over_tls_with_a_token_meant_for_the_store() {
    let front_proxy_ca = ca("front-proxy-ca");
    let serving_ca = ca("kprof-api-ca");
    let serving = leaf(
        &serving_ca,
        "kprof-api",
        &["kprof-api.kprof-system.svc", "kprof-store.kprof-system.svc"],
    );
    let tls_dir = tempfile::tempdir().unwrap();
    write_serving(tls_dir.path(), &serving);
    let api: Shared = Arc::new(Mutex::new(FakeApi {
        auth_configmap: json!({"requestheader-client-ca-file": front_proxy_ca.cert.pem()}),
        ..Default::default()
    }));
    let readers = front_proxy(tls_dir.path(), std::time::Duration::from_secs(60), true);
    let s = TestStore::start_configured(api, |c| {
        c.readers = readers;
        c.upload_audience = Some(kprof_store::UPLOAD_AUDIENCE.into());
    })
    .await;
    let pprof = Bytes::from(sample_pprof(60, 20));
    let d = store_common::Digest::of(&pprof);
    let path = format!("/v1/artifacts/{d}");
    let put = |token: &'static str| {
        let (pprof, path, ca) = (pprof.clone(), path.clone(), &serving_ca);
        let auth = format!("Bearer {token}");
        async move {
            let headers = [
                ("authorization", auth.as_str()),
                ("x-kprof-namespace", "shop"),
            ];
            tls_request(s.addr, ca, None, "PUT", &path, &headers, pprof).await
        }
    };
    // The agent's ordinary token (the API server's audience) is refused; the store's passes.
    let (status, body) = put(AGENT_API_TOKEN).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body.contains("not meant for kprof-store") || body.contains("audiences"),
        "{body}"
    );
    let (status, body) = put(AGENT_TOKEN).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Plain HTTP on the upload port gets no answer.
    let url = s.url(&path);
    let plain = tokio::spawn(async move {
        tokio::time::timeout(std::time::Duration::from_secs(5), request_with(&url, &[])).await
    })
    .await;
    assert!(
        !matches!(&plain, Ok(Ok((StatusCode::OK | StatusCode::CREATED, ..)))),
        "plain HTTP was served"
    );
}
