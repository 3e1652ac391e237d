//! The profile store on Azure Blob Storage, as a real server speaks it: Azurite's blob service
//! (the npm package, installed by `e2e/testbed/install-azurite.sh`) on 127.0.0.1 with a temp
//! dir, the store configured with `--store-url az://…` and `AZURE_STORAGE_USE_EMULATOR`, as
//! object_store reads it from a Pod's environment.
//!
//! The round trip of `store_common::backend` (upload, read back, digest mismatch, listing,
//! rendering, GC, restart); the listing is the Blob service's own List Blobs call, signed with
//! the account key, not object_store's.
//!
//! Without Azurite the test is skipped (loudly); `KPROF_REQUIRE_AZURE=1` (set by `make test`)
//! makes that a failure.

mod store_common;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use http::{Method, StatusCode};
use store_common::backend::*;
use store_common::*;

const CONTAINER: &str = "kprof-test";
/// Azurite's well-known development account and key (public: they only open the emulator).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const API_VERSION: &str = "2021-08-06";

/// Azurite's blob service on 127.0.0.1.
struct Azurite(ServerProcess);

impl Azurite {
    async fn start(bin: &PathBuf) -> Self {
        // Any answer means it listens: an unsigned request is refused with 403.
        let probe = format!("/{ACCOUNT}?comp=list");
        let server =
            ServerProcess::start("Azurite", &probe, StatusCode::FORBIDDEN, |data, port| {
                let mut c = Command::new(bin);
                c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .arg("--location")
                    .arg(data.join("data"))
                    // No usage telemetry from a test; object_store may ask for a newer service
                    // version than this Azurite knows (the calls it makes are old).
                    .args(["--disableTelemetry", "--skipApiVersionCheck"]);
                c
            })
            .await;
        Self(server)
    }

    /// `PUT /{account}/{container}?restype=container` (object_store cannot create containers).
    async fn create_container(&self) -> (StatusCode, String) {
        let (status, body) = signed(
            &self.0.endpoint,
            Method::PUT,
            CONTAINER,
            &[("restype", "container")],
        )
        .await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The blobs under the store's prefix, from List Blobs: name → size.
    async fn listing(endpoint: String) -> Listing {
        let prefix = format!("{PREFIX}/artifacts/sha256/");
        let (status, body) = signed(
            &endpoint,
            Method::GET,
            CONTAINER,
            &[
                ("comp", "list"),
                ("prefix", &prefix),
                ("restype", "container"),
            ],
        )
        .await;
        let xml = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::OK, "{xml}");
        let listed: EnumerationResults = quick_xml::de::from_str(&xml).unwrap();
        let mut out: Listing = listed
            .blobs
            .blob
            .into_iter()
            .map(|b| (b.name, b.properties.content_length))
            .collect();
        out.sort();
        out
    }
}

/// The parts of a List Blobs answer the test reads.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnumerationResults {
    blobs: Blobs,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Blobs {
    #[serde(default)]
    blob: Vec<Blob>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Blob {
    name: String,
    properties: BlobProperties,
}

#[derive(serde::Deserialize)]
struct BlobProperties {
    #[serde(rename = "Content-Length")]
    content_length: u64,
}

/// A Blob service request on `path` (a container, or `container/blob`), authorized with the account key (Shared Key:
/// an HMAC-SHA256 of the verb, the standard headers, the `x-ms-` headers and the resource).
async fn signed(
    endpoint: &str,
    method: Method,
    path: &str,
    query: &[(&str, &str)],
) -> (StatusCode, bytes::Bytes) {
    let date = k8s_openapi::jiff::Timestamp::now()
        .strftime("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    // The emulator's URLs carry the account in the path, so the resource names it twice.
    let mut resource = format!("/{ACCOUNT}/{ACCOUNT}/{path}");
    let mut sorted: Vec<&(&str, &str)> = query.iter().collect();
    sorted.sort();
    for (k, v) in &sorted {
        resource.push_str(&format!("\n{k}:{v}"));
    }
    // Verb, then eleven standard headers (all empty here; an empty body's Content-Length
    // signs as empty), then the x-ms- headers and the resource.
    let to_sign = format!(
        "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n{resource}"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(ACCOUNT_KEY)
        .unwrap();
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        to_sign.as_bytes(),
    );
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.as_ref());
    let qs: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(query.iter())
        .finish();
    let url = match qs.is_empty() {
        true => format!("{endpoint}/{ACCOUNT}/{path}"),
        false => format!("{endpoint}/{ACCOUNT}/{path}?{qs}"),
    };
    let authorization = format!("SharedKey {ACCOUNT}:{signature}");
    let headers = [
        ("x-ms-date", date.as_str()),
        ("x-ms-version", API_VERSION),
        ("authorization", authorization.as_str()),
    ];
    let (status, _, body) = send(method, &url, &headers, bytes::Bytes::new()).await;
    (status, body)
}

#[tokio::test]
async fn store_on_azurite() {
    let Some(bin) = binary_or_skip(
        "store_azure",
        cached_binary("KPROF_AZURITE", "azurite", "azurite-blob"),
        "no azurite-blob under $KPROF_CACHE/azurite (default /var/cache/kprof/azurite) and KPROF_AZURITE unset",
        "KPROF_REQUIRE_AZURE",
        "Install it with `e2e/testbed/install-azurite.sh`",
    ) else {
        return;
    };
    let azurite = Azurite::start(&bin).await;
    let (status, body) = azurite.create_container().await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "create container: {body}; Azurite log:\n{}",
        azurite.0.log()
    );

    // The store reads its Azure settings from the environment, as in a Pod: the emulator's
    // account and key, at Azurite's address.
    set_env(&[
        ("AZURE_STORAGE_USE_EMULATOR", "true"),
        ("AZURITE_BLOB_STORAGE_URL", azurite.0.endpoint.as_str()),
    ]);
    let url = format!("az://{CONTAINER}/{PREFIX}");
    let endpoint = azurite.0.endpoint.clone();
    let stored = round_trip(&url, || Azurite::listing(endpoint.clone())).await;
    // The Blob service's own Get Blob gives the store's bytes.
    let blob = format!("{CONTAINER}/{}", stored.pprof_object);
    let (status, got) = signed(&azurite.0.endpoint, Method::GET, &blob, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.as_ref(), stored.pprof.as_slice());
    println!(
        "Azurite {}: the store's artifacts are in container {CONTAINER}",
        azurite.0.endpoint
    );
}
