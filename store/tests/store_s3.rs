//! The profile store on a real S3-compatible server: MinIO (built by `e2e/testbed/build-s3.sh`)
//! on 127.0.0.1 with a temp dir, the store configured with `--store-url s3://…` and the endpoint
//! and credentials in the usual `AWS_*` variables (read by object_store's `from_env`).
//!
//! Uploads through the store's HTTP API come back byte-identical, a digest mismatch is refused
//! and writes nothing, garbage collection deletes an unreferenced artifact from the bucket, and a
//! restarted store serves what the first one stored.
//!
//! Without the MinIO binary the test is skipped (loudly); `KPROF_REQUIRE_S3=1` (set by
//! `make test`) makes that a failure.

mod store_common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use http::{Method, StatusCode};
use kprof_store::{self as store, Backend, Digest, StoreConfig, StoreMetrics};
use object_store::ObjectStore;
use store_common::*;

const BUCKET: &str = "kprof-test";
const PREFIX: &str = "cluster-a";
const ACCESS_KEY: &str = "kprof-test-user";
const SECRET_KEY: &str = "kprof-test-secret-0123456789";
const REGION: &str = "us-east-1";

/// The cached MinIO binary: `$KPROF_MINIO`, else any version under `$KPROF_CACHE/minio`.
fn minio_binary() -> Option<PathBuf> {
    cached_binary("KPROF_MINIO", "minio", "minio")
}

/// A MinIO server on 127.0.0.1, killed on drop.
struct Minio {
    child: Child,
    endpoint: String,
    data: tempfile::TempDir,
    /// Where the test sees MinIO's drive: under `/proc/<pid>/root` when the drive is a tmpfs
    /// in MinIO's own mount namespace.
    drive: PathBuf,
}

impl Drop for Minio {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command that starts MinIO on `drive`. MinIO refuses writes once its drive's file system
/// is about 99 % full, which a build machine's big shared disk can be; as root the drive is
/// therefore a private tmpfs, mounted in a mount namespace of MinIO's own (gone with the
/// process, invisible to the rest of the machine). Returns whether it is.
fn drive_command(bin: &PathBuf, drive: &std::path::Path) -> (Command, bool) {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!(
            "NOTE: not root, so MinIO's drive is on the shared disk (it refuses writes when that is nearly full)"
        );
        return (Command::new(bin), false);
    }
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--"])
        .args([
            "sh",
            "-c",
            r#"mount -t tmpfs -o size=4g,mode=0700 kprof-minio "$1" && shift && exec "$@""#,
        ])
        .arg("sh")
        .arg(drive)
        .arg(bin);
    (command, true)
}

impl Minio {
    async fn start(bin: &PathBuf) -> Self {
        let data = tempfile::tempdir().unwrap();
        let (port, console) = (free_port(), free_port());
        let log = std::fs::File::create(data.path().join("minio.log")).unwrap();
        let drive = data.path().join("drive");
        std::fs::create_dir_all(&drive).unwrap();
        let (mut command, on_tmpfs) = drive_command(bin, &drive);
        let child = command
            .arg("server")
            .arg(&drive)
            .args(["--address", &format!("127.0.0.1:{port}")])
            .args(["--console-address", &format!("127.0.0.1:{console}")])
            .arg("--certs-dir")
            .arg(data.path().join("certs"))
            .env("HOME", data.path())
            .env("MINIO_ROOT_USER", ACCESS_KEY)
            .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
            // Loopback only: no update checks, no console, no call-home.
            .env("MINIO_UPDATE", "off")
            .env("MINIO_BROWSER", "off")
            .env("MINIO_CALLHOME_ENABLE", "off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let drive = match on_tmpfs {
            true => PathBuf::from(format!("/proc/{}/root", child.id()))
                .join(drive.strip_prefix("/").unwrap()),
            false => drive,
        };
        let m = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            data,
            drive,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = try_get(&format!("{}/minio/health/ready", m.endpoint)).await;
            if status == Some(StatusCode::OK) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "MinIO did not become ready in 60 s; its log:\n{}",
                m.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("minio.log")).unwrap_or_default()
    }

    /// `PUT /{bucket}` signed with AWS Signature V4 (object_store cannot create buckets).
    async fn create_bucket(&self, bucket: &str) -> StatusCode {
        let host = self.endpoint.trim_start_matches("http://");
        let now = k8s_openapi::jiff::Timestamp::now();
        let (date, day) = (
            now.strftime("%Y%m%dT%H%M%SZ").to_string(),
            now.strftime("%Y%m%d").to_string(),
        );
        let empty = hex(ring::digest::digest(&ring::digest::SHA256, b"").as_ref());
        let canonical = format!(
            "PUT\n/{bucket}\n\nhost:{host}\nx-amz-content-sha256:{empty}\nx-amz-date:{date}\n\nhost;x-amz-content-sha256;x-amz-date\n{empty}"
        );
        let scope = format!("{day}/{REGION}/s3/aws4_request");
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
            hex(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
        );
        let mut key = format!("AWS4{SECRET_KEY}").into_bytes();
        for part in [day.as_str(), REGION, "s3", "aws4_request", to_sign.as_str()] {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
            key = ring::hmac::sign(&k, part.as_bytes()).as_ref().to_vec();
        }
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={}",
            hex(&key)
        );
        let req = http::Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/{bucket}", self.endpoint))
            .header("x-amz-date", &date)
            .header("x-amz-content-sha256", &empty)
            .header("authorization", auth)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        client.request(req).await.unwrap().status()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The status of `GET url`, `None` when nothing answers (yet).
async fn try_get(url: &str) -> Option<StatusCode> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    client.request(req).await.ok().map(|r| r.status())
}

/// A store on 127.0.0.1 with the given backend URL and API client; stops when the sender drops.
async fn start_store(
    url: &str,
    client: kube::Client,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let mut config = StoreConfig::for_dir("/nonexistent", "127.0.0.1:0".parse().unwrap(), AGENT);
    config.backend = Backend::Url(url.to_string());
    let bound = store::Store::new(config, client, StoreMetrics::default())
        .unwrap()
        .bind()
        .await
        .unwrap();
    let base = format!("http://{}", bound.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.run(async move {
        let _ = rx.await;
    }));
    (base, tx)
}

/// The objects under the store's prefix, listed by an S3 client of the test's own (not the
/// store's): name → size.
async fn bucket_listing() -> Vec<(String, u64)> {
    let s3 = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(BUCKET)
        .build()
        .unwrap();
    let prefix = object_store::path::Path::from(format!("{PREFIX}/artifacts/sha256"));
    let mut out: Vec<(String, u64)> = s3
        .list(Some(&prefix))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap();
    out.sort();
    out
}

#[tokio::test]
async fn store_on_minio() {
    let Some(bin) = minio_binary() else {
        let why = "no MinIO binary under $KPROF_CACHE/minio (default /var/cache/kprof/minio) and KPROF_MINIO unset";
        if std::env::var("KPROF_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("KPROF_REQUIRE_S3=1 but {why}; build it with e2e/testbed/build-s3.sh");
        }
        // Straight to the process's stderr: libtest captures `eprintln!` of passing tests, and
        // a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED store_s3: {why}. Build it with `e2e/testbed/build-s3.sh` (or `make deps`), \
             set KPROF_REQUIRE_S3=1 to make this a failure."
        );
        return;
    };
    let minio = Minio::start(&bin).await;
    let created = minio.create_bucket(BUCKET).await;
    assert_eq!(
        created,
        StatusCode::OK,
        "create bucket; MinIO log:\n{}",
        minio.log()
    );

    // The store reads its S3 settings from the environment, as in a Pod. This is the only test
    // in this binary, and nothing else reads the environment concurrently.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", REGION),
        ("AWS_ENDPOINT", minio.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        // SAFETY: single-threaded with respect to the environment (see above).
        unsafe { std::env::set_var(k, v) };
    }
    let url = format!("s3://{BUCKET}/{PREFIX}");

    // The fake API server (TokenReview, Profiles) comes with a directory store we leave unused.
    let api = TestStore::start(1 << 20).await;
    let (base, stop) = start_store(&url, api.client.clone()).await;
    let upload = |bytes: Vec<u8>| {
        let base = base.clone();
        async move {
            let d = Digest::of(&bytes);
            put(
                &format!("{base}/v1/artifacts/{d}"),
                &bytes,
                Some(AGENT_TOKEN),
            )
            .await
        }
    };

    let pprof = sample_pprof(60, 20);
    let svg = b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"/>".to_vec();
    let orphan = b"an artifact no Profile references".to_vec();
    for a in [&pprof, &svg, &orphan] {
        let (status, _, body) = upload(a.clone()).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _, _) = upload(pprof.clone()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same bytes again: already present"
    );

    // Read back byte-identical.
    for a in [&pprof, &svg, &orphan] {
        let (status, headers, got) = get(&format!(
            "{base}/apis/data.kprof.io/v1alpha1/artifacts/{}",
            Digest::of(a)
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got.as_ref(), a.as_slice());
        assert_eq!(headers["etag"], format!("\"{}\"", Digest::of(a)));
    }
    println!(
        "store on {url} (MinIO {}): 3 artifacts uploaded and read back",
        minio.endpoint
    );

    // A digest mismatch is refused and writes nothing.
    let wrong = Digest::of(b"something else");
    let (status, _, body) = put(
        &format!("{base}/v1/artifacts/{wrong}"),
        b"the body",
        Some(AGENT_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("digest mismatch"));

    // In the bucket, seen by an S3 client of our own, and on MinIO's drive.
    let listing = bucket_listing().await;
    println!("bucket {BUCKET}: {listing:?}");
    let want = |a: &[u8]| {
        (
            format!("{PREFIX}/artifacts/sha256/{}", Digest::of(a).hex()),
            a.len() as u64,
        )
    };
    let mut expected = vec![want(&pprof), want(&svg), want(&orphan)];
    expected.sort();
    assert_eq!(listing, expected);
    let on_drive = minio.drive.join(BUCKET).join(&want(&pprof).0);
    assert!(on_drive.join("xl.meta").is_file(), "{}", on_drive.display());

    // Rendering and the by-Profile routes read from S3 too.
    api.add_profile("shop", "p1", Some(&pprof), Some(&svg));
    let (status, _, top) = get(&format!(
        "{base}/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/p1/top?limit=1"
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
    assert_eq!(top["rows"][0]["function"], "checkout.compute_total");

    // Garbage collection: the unreferenced artifact leaves the bucket, the referenced stay.
    let artifacts = store::Artifacts::from_url(&url).unwrap();
    let r = store::gc::run_once(&artifacts, &api.client, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!((r.kept, r.young, r.deleted.len()), (2, 1, 0));
    let r = store::gc::run_once(&artifacts, &api.client, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec![Digest::of(&orphan)]);
    let mut expected = vec![want(&pprof), want(&svg)];
    expected.sort();
    assert_eq!(bucket_listing().await, expected);
    let (status, _, _) = get(&format!(
        "{base}/apis/data.kprof.io/v1alpha1/artifacts/{}",
        Digest::of(&orphan)
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A new store process on the same URL serves what the first one stored.
    drop(stop);
    let (base2, _stop2) = start_store(&url, api.client.clone()).await;
    assert_ne!(base, base2);
    let (status, _, got) = get(&format!(
        "{base2}/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/p1/pprof"
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.as_ref(), pprof.as_slice());
    let (status, _, got) = get(&format!(
        "{base2}/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/p1/flamegraph"
    ))
    .await;
    assert_eq!((status, got.as_ref()), (StatusCode::OK, svg.as_slice()));
    let d = Digest::of(&pprof);
    let (status, _, _) = put(
        &format!("{base2}/v1/artifacts/{d}"),
        &pprof,
        Some(AGENT_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "still present after the restart");
    println!(
        "restarted store at {base2} serves the artifacts; GC deleted {}",
        Digest::of(&orphan)
    );
}
