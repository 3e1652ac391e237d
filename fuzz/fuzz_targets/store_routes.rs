//! The store's HTTP routes as anyone who reaches its upload port can call them: any method,
//! path, query, headers and body, on a running store (its Kubernetes API faked: every token is
//! the agent's), with the read routes on the same listener (the tests' configuration) so that
//! every route's parsing is reached. The store never panics and never answers 5xx.
#![no_main]
use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use kprof_store::{Store, StoreConfig, StoreMetrics};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const AGENT: &str = "system:serviceaccount:kprof-system:kprof-agent";

/// A stand-in for the API server: TokenReviews say "the agent", lists are empty, and so no
/// named object exists (404: the store answers 404 too, where a failing API server would
/// give 502).
async fn fake_api(
    req: http::Request<kube::client::Body>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let named = segments.len() >= 2
        && ["profiles", "profilingtargets", "pods"].contains(&segments[segments.len() - 2]);
    let (status, body) = if path.ends_with("/tokenreviews") {
        (
            201,
            serde_json::json!({"apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": true, "user": {"username": AGENT}}}),
        )
    } else if named && req.method() == http::Method::GET {
        (
            404,
            serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    } else {
        (
            200,
            serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {},
            "items": []}),
        )
    };
    let _ = req.into_body().collect().await;
    Ok(http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

/// The store, started once for the whole run.
fn store() -> &'static (tokio::runtime::Runtime, SocketAddr) {
    static STORE: OnceLock<(tokio::runtime::Runtime, SocketAddr)> = OnceLock::new();
    STORE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        let addr = rt.block_on(async {
            let client = kube::Client::new(tower::service_fn(fake_api), "default");
            let mut config = StoreConfig::for_dir(
                dir.path().join("store"),
                "127.0.0.1:0".parse().unwrap(),
                AGENT,
            );
            config.max_upload_bytes = 1 << 16;
            let bound = Store::new(config, client, StoreMetrics::default())
                .unwrap()
                .bind()
                .await
                .unwrap();
            let addr = bound.local_addr();
            tokio::spawn(bound.run(std::future::pending()));
            addr
        });
        (rt, addr)
    })
}

/// Builds a request from the input: method, target, header lines, body.
fn request(data: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let method = parts.next().unwrap_or("GET").trim();
    let method = if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        "GET"
    } else {
        method
    };
    let target = parts.next().unwrap_or("/").trim();
    let target: String = target.chars().filter(|c| c.is_ascii_graphic()).collect();
    let target = if target.starts_with('/') {
        target
    } else {
        format!("/{target}")
    };
    let headers: Vec<&str> = parts
        .next()
        .unwrap_or("")
        .split(';')
        .filter(|h| h.contains(':') && !h.to_ascii_lowercase().starts_with("content-length"))
        .collect();
    let body = parts.next().unwrap_or("").as_bytes();
    let mut req = format!("{method} {target} HTTP/1.1\r\nhost: store\r\nconnection: close\r\n");
    for h in headers {
        let h: String = h.chars().filter(|c| *c != '\r').collect();
        req.push_str(&h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

fuzz_target!(|data: &[u8]| {
    let (rt, addr) = store();
    let req = request(data);
    let answer = rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
        out
    });
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).into_owned();
    // hyper may refuse a malformed request line or header with a 400 and close: fine.
    // The only documented 5xx are the backend's (500, not with a local directory) and a
    // failed TokenReview (503, not with this API server).
    if let Some(status) = head.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)) {
        assert!(!status.starts_with('5'), "{head}");
    }
});
