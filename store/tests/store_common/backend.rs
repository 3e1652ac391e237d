//! The round trip every object-store backend must pass against its real server (MinIO for S3,
//! fake-gcs-server for GCS, Azurite for Azure Blob): uploads through the store's HTTP API come
//! back byte-identical, a digest mismatch is refused and writes nothing, the objects are where
//! the backend's own listing says, rendering and the by-Profile routes read from the backend,
//! garbage collection deletes an unreferenced artifact, and a restarted store serves what the
//! first one stored.

use std::future::Future;
use std::time::Duration;

use http::StatusCode;
use kprof_store::{self as store, Backend, Digest, StoreConfig, StoreMetrics};

use super::*;

/// Where the store keeps its artifacts inside the bucket or container.
pub const PREFIX: &str = "cluster-a";

/// Objects in the bucket as `(name, size)`, sorted.
pub type Listing = Vec<(String, u64)>;

/// A server process on 127.0.0.1 with a temp dir of its own, its output in `server.log`
/// there; killed on drop.
pub struct ServerProcess {
    child: std::process::Child,
    pub endpoint: String,
    pub data: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `command(data dir, port)` and waits up to 60 s until `GET ready_path` answers
    /// with `ready`.
    pub async fn start(
        what: &str,
        ready_path: &str,
        ready: StatusCode,
        command: impl FnOnce(&std::path::Path, u16) -> std::process::Command,
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(data.path().join("server.log")).unwrap();
        let child = command(data.path(), port)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            data,
        };
        let url = format!("{}{ready_path}", server.endpoint);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answer = try_send(http::Method::GET, &url, &[], bytes::Bytes::new()).await;
            if answer.is_ok_and(|(status, _, _)| status == ready) {
                return server;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not become ready in 60 s; its log:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Skips the calling test loudly when its server binary is missing, or fails when
/// `require_var=1` (as `make test` sets it). Returns the binary.
pub fn binary_or_skip(
    test: &str,
    found: Option<std::path::PathBuf>,
    why: &str,
    require_var: &str,
    how: &str,
) -> Option<std::path::PathBuf> {
    if found.is_some() {
        return found;
    }
    if std::env::var(require_var).as_deref() == Ok("1") {
        panic!("{require_var}=1 but {why}; {how}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests, and a
    // skip must be seen.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}. {how} (or `make deps`), set {require_var}=1 to make this a failure."
    );
    None
}

/// Sets variables of the process environment, where the store reads its backend settings (as
/// in a Pod). Each backend test is the only test of its binary, so nothing reads the
/// environment concurrently.
pub fn set_env(vars: &[(&str, &str)]) {
    for (k, v) in vars {
        // SAFETY: single-threaded with respect to the environment (see above).
        unsafe { std::env::set_var(k, v) };
    }
}

/// A store on 127.0.0.1 with the given backend URL and API client; stops when the sender drops.
pub async fn start_store(
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

/// What [`round_trip`] stored, for a backend's own further checks.
pub struct Stored {
    pub pprof: Vec<u8>,
    /// The object name of `pprof` in the bucket.
    pub pprof_object: String,
}

/// The round trip on the store at `url` (`scheme://bucket/PREFIX`). `list` lists the objects
/// under `PREFIX/artifacts/sha256` with a client of the test's own, not the store's.
pub async fn round_trip<L, F>(url: &str, list: L) -> Stored
where
    L: Fn() -> F,
    F: Future<Output = Listing>,
{
    // The fake API server (TokenReview, Profiles) comes with a directory store we leave unused.
    let api = TestStore::start(1 << 20).await;
    let (base, stop) = start_store(url, api.client.clone()).await;
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
    let (status, _, body) = upload(pprof.clone()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same bytes again: already present; {}",
        String::from_utf8_lossy(&body)
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
    println!("store on {url}: 3 artifacts uploaded and read back");

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

    // In the bucket, as the backend's own listing shows it.
    let listing = list().await;
    println!("listing of {url}: {listing:?}");
    let want = |a: &[u8]| {
        (
            format!("{PREFIX}/artifacts/sha256/{}", Digest::of(a).hex()),
            a.len() as u64,
        )
    };
    let mut expected = vec![want(&pprof), want(&svg), want(&orphan)];
    expected.sort();
    assert_eq!(listing, expected);

    // Rendering and the by-Profile routes read from the backend too.
    api.add_profile("shop", "p1", Some(&pprof), Some(&svg));
    let (status, _, top) = get(&format!(
        "{base}/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/p1/top?limit=1"
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
    assert_eq!(top["rows"][0]["function"], "checkout.compute_total");

    // Garbage collection: the unreferenced artifact leaves the bucket, the referenced stay.
    let artifacts = store::Artifacts::from_url(url).unwrap();
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
    assert_eq!(list().await, expected);
    let (status, _, _) = get(&format!(
        "{base}/apis/data.kprof.io/v1alpha1/artifacts/{}",
        Digest::of(&orphan)
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A new store process on the same URL serves what the first one stored.
    drop(stop);
    let (base2, _stop2) = start_store(url, api.client.clone()).await;
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
    Stored {
        pprof_object: want(&pprof).0,
        pprof,
    }
}
