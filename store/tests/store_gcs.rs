//! The profile store on Google Cloud Storage, as a real server speaks it: fake-gcs-server (built
//! by `e2e/testbed/build-gcs.sh`) on 127.0.0.1 with a temp dir, the store configured with
//! `--store-url gs://…` and a service-account file that points object_store at the server, as a
//! Pod would mount one.
//!
//! The round trip of `store_common::backend` (upload, read back, digest mismatch, listing,
//! rendering, GC, restart); the listing is the server's own JSON API, not object_store's.
//!
//! fake-gcs-server lacks one call of the XML API that object_store uses, the plain object
//! upload `PUT /{bucket}/{object}` (fsouza/fake-gcs-server#1164; object_store's own CI runs a
//! patched build). The test's [`front`] passes every other request through unchanged and turns
//! that one into the JSON API's media upload, answering with the XML API's `ETag` and
//! `x-goog-generation` headers taken from the server's answer.
//!
//! Without the server binary the test is skipped (loudly); `KPROF_REQUIRE_GCS=1` (set by
//! `make test`) makes that a failure.

mod store_common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use store_common::backend::*;
use store_common::*;

const BUCKET: &str = "kprof-test";

/// A fake-gcs-server on 127.0.0.1.
struct FakeGcs(ServerProcess);

impl FakeGcs {
    async fn start(bin: &PathBuf) -> Self {
        let server = ServerProcess::start(
            "fake-gcs-server",
            "/storage/v1/b",
            StatusCode::OK,
            |data, port| {
                let mut c = Command::new(bin);
                c.args(["-scheme", "http", "-host", "127.0.0.1"])
                    .args(["-port", &port.to_string()])
                    .args(["-public-host", &format!("127.0.0.1:{port}")])
                    .args(["-backend", "filesystem", "-filesystem-root"])
                    .arg(data.join("root"));
                c
            },
        )
        .await;
        Self(server)
    }

    /// `POST /storage/v1/b`, the JSON API's bucket insert (object_store cannot create buckets).
    async fn create_bucket(&self, bucket: &str) -> StatusCode {
        let body = serde_json::json!({ "name": bucket }).to_string();
        let (status, _, _) = send(
            Method::POST,
            &format!("{}/storage/v1/b", self.0.endpoint),
            &[("content-type", "application/json")],
            Bytes::from(body),
        )
        .await;
        status
    }

    /// The objects under the store's prefix, from the server's JSON API: name → size.
    async fn listing(endpoint: String) -> Listing {
        let url = format!("{endpoint}/storage/v1/b/{BUCKET}/o?prefix={PREFIX}/artifacts/sha256/");
        let (status, _, body) = send(Method::GET, &url, &[], Bytes::new()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut out: Listing = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                // The JSON API gives sizes as strings.
                let size = o["size"].as_str().and_then(|s| s.parse().ok());
                (
                    o["name"].as_str().unwrap_or_default().to_string(),
                    size.unwrap_or(u64::MAX),
                )
            })
            .collect();
        out.sort();
        out
    }
}

/// `%XX` escapes decoded (object_store escapes every byte of a bucket or object name that is
/// not alphanumeric).
fn unescape(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// The front before fake-gcs-server at `server` (see the module's comment); returns its URL.
async fn front(server: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| forward(server.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

async fn forward(
    server: String,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().trim_start_matches('/');
    // Passed on as they came, but for Host: the server answers the XML API on its own name.
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter(|(k, _)| *k != http::header::HOST)
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let object_put = match (&parts.method, parts.uri.query(), path.split_once('/')) {
        (&Method::PUT, None, Some((bucket, object))) => Some((unescape(bucket), unescape(object))),
        _ => None,
    };
    let mut answer = Response::builder();
    let (status, got_headers, got) = match object_put {
        Some((bucket, object)) => {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("uploadType", "media")
                .append_pair("name", &object)
                .finish();
            let url = format!("{server}/upload/storage/v1/b/{bucket}/o?{query}");
            let (status, _, got) = send(Method::POST, &url, &headers, body).await;
            if status.is_success() {
                let v: serde_json::Value = serde_json::from_slice(&got).unwrap_or_default();
                answer = answer
                    .header(
                        "etag",
                        format!("\"{}\"", v["etag"].as_str().unwrap_or_default()),
                    )
                    .header(
                        "x-goog-generation",
                        v["generation"].as_str().unwrap_or_default(),
                    );
            }
            (status, http::HeaderMap::new(), got)
        }
        None => {
            let url = format!("{server}{}", parts.uri.path_and_query().unwrap());
            send(parts.method.clone(), &url, &headers, body).await
        }
    };
    // The body is passed whole, so its length stands (HEAD's too, which has no body).
    for (k, v) in &got_headers {
        if k != http::header::TRANSFER_ENCODING {
            answer = answer.header(k, v);
        }
    }
    Ok(answer.status(status).body(Full::new(got)).unwrap())
}

#[tokio::test]
async fn store_on_fake_gcs_server() {
    let Some(bin) = binary_or_skip(
        "store_gcs",
        cached_binary("KPROF_FAKE_GCS", "fake-gcs-server", "fake-gcs-server"),
        "no fake-gcs-server binary under $KPROF_CACHE/fake-gcs-server (default /var/cache/kprof/fake-gcs-server) and KPROF_FAKE_GCS unset",
        "KPROF_REQUIRE_GCS",
        "Build it with `e2e/testbed/build-gcs.sh`",
    ) else {
        return;
    };
    let gcs = FakeGcs::start(&bin).await;
    let created = gcs.create_bucket(BUCKET).await;
    assert_eq!(
        created,
        StatusCode::OK,
        "create bucket; fake-gcs-server log:\n{}",
        gcs.0.log()
    );

    // The store reads its GCS settings from the environment, as in a Pod: a service-account
    // file whose base URL is the server (through the front) and which asks for no OAuth token (the server checks
    // none).
    let base = front(gcs.0.endpoint.clone()).await;
    let account = gcs.0.data.path().join("service-account.json");
    std::fs::write(
        &account,
        serde_json::json!({
            "gcs_base_url": base,
            "disable_oauth": true,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        })
        .to_string(),
    )
    .unwrap();
    set_env(&[("GOOGLE_SERVICE_ACCOUNT", account.to_str().unwrap())]);
    let url = format!("gs://{BUCKET}/{PREFIX}");
    let endpoint = gcs.0.endpoint.clone();
    let stored = round_trip(&url, || FakeGcs::listing(endpoint.clone())).await;

    // The server's own object read gives the store's bytes.
    let object = stored.pprof_object.replace('/', "%2F");
    let (status, _, got) = send(
        Method::GET,
        &format!(
            "{}/storage/v1/b/{BUCKET}/o/{object}?alt=media",
            gcs.0.endpoint
        ),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.as_ref(), stored.pprof.as_slice());
    println!(
        "fake-gcs-server {}: the store's artifacts are in bucket {BUCKET}",
        gcs.0.endpoint
    );
}
