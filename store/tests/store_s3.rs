//! The profile store on a real S3-compatible server: MinIO (built by `e2e/testbed/build-s3.sh`)
//! on 127.0.0.1 with a temp dir, the store configured with `--store-url s3://…` and the endpoint
//! and credentials in the usual `AWS_*` variables (read by object_store's `from_env`).
//!
//! The round trip of `store_common::backend` (upload, read back, digest mismatch, listing,
//! rendering, GC, restart), and the objects are on MinIO's drive.
//!
//! Without the MinIO binary the test is skipped (loudly); `KPROF_REQUIRE_S3=1` (set by
//! `make test`) makes that a failure.

mod store_common;

use std::path::PathBuf;
use std::process::Command;

use futures::TryStreamExt;
use http::{Method, StatusCode};
use object_store::ObjectStore;
use store_common::backend::*;
use store_common::*;

const BUCKET: &str = "kprof-test";
const ACCESS_KEY: &str = "kprof-test-user";
const SECRET_KEY: &str = "kprof-test-secret-0123456789";
const REGION: &str = "us-east-1";

/// The cached MinIO binary: `$KPROF_MINIO`, else any version under `$KPROF_CACHE/minio`.
fn minio_binary() -> Option<PathBuf> {
    cached_binary("KPROF_MINIO", "minio", "minio")
}

/// A MinIO server on 127.0.0.1.
struct Minio {
    server: ServerProcess,
    /// Where the test sees MinIO's drive: under `/proc/<pid>/root` when the drive is a tmpfs
    /// in MinIO's own mount namespace.
    drive: PathBuf,
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
        let console = free_port();
        let mut on_tmpfs = false;
        let mut drive = PathBuf::new();
        let server = ServerProcess::start(
            "MinIO",
            "/minio/health/ready",
            StatusCode::OK,
            |data, port| {
                drive = data.join("drive");
                std::fs::create_dir_all(&drive).unwrap();
                let mut command;
                (command, on_tmpfs) = drive_command(bin, &drive);
                command
                    .arg("server")
                    .arg(&drive)
                    .args(["--address", &format!("127.0.0.1:{port}")])
                    .args(["--console-address", &format!("127.0.0.1:{console}")])
                    .arg("--certs-dir")
                    .arg(data.join("certs"))
                    .env("HOME", data)
                    .env("MINIO_ROOT_USER", ACCESS_KEY)
                    .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
                    // Loopback only: no update checks, no console, no call-home.
                    .env("MINIO_UPDATE", "off")
                    .env("MINIO_BROWSER", "off")
                    .env("MINIO_CALLHOME_ENABLE", "off");
                command
            },
        )
        .await;
        if on_tmpfs {
            drive = PathBuf::from(format!("/proc/{}/root", server.pid()))
                .join(drive.strip_prefix("/").unwrap());
        }
        Self { server, drive }
    }

    /// `PUT /{bucket}` signed with AWS Signature V4 (object_store cannot create buckets).
    async fn create_bucket(&self, bucket: &str) -> StatusCode {
        let host = self.server.endpoint.trim_start_matches("http://");
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
        let headers = [
            ("x-amz-date", date.as_str()),
            ("x-amz-content-sha256", empty.as_str()),
            ("authorization", auth.as_str()),
        ];
        let url = format!("{}/{bucket}", self.server.endpoint);
        send(Method::PUT, &url, &headers, bytes::Bytes::new())
            .await
            .0
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
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
    let Some(bin) = binary_or_skip(
        "store_s3",
        minio_binary(),
        "no MinIO binary under $KPROF_CACHE/minio (default /var/cache/kprof/minio) and KPROF_MINIO unset",
        "KPROF_REQUIRE_S3",
        "Build it with `e2e/testbed/build-s3.sh`",
    ) else {
        return;
    };
    let minio = Minio::start(&bin).await;
    let created = minio.create_bucket(BUCKET).await;
    assert_eq!(
        created,
        StatusCode::OK,
        "create bucket; MinIO log:\n{}",
        minio.server.log()
    );

    // The store reads its S3 settings from the environment, as in a Pod.
    set_env(&[
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", REGION),
        ("AWS_ENDPOINT", minio.server.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ]);
    let url = format!("s3://{BUCKET}/{PREFIX}");
    let stored = round_trip(&url, bucket_listing).await;
    // On MinIO's drive, where MinIO keeps an object as a directory with its metadata.
    let on_drive = minio.drive.join(BUCKET).join(&stored.pprof_object);
    assert!(on_drive.join("xl.meta").is_file(), "{}", on_drive.display());
    println!(
        "MinIO {}: the store's artifacts are on its drive ({} bytes of pprof)",
        minio.server.endpoint,
        stored.pprof.len()
    );
}
