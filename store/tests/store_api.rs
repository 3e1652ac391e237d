//! The profile store in-process on 127.0.0.1 with a temp dir, against a fake API server:
//! upload contract, reads, rendering on read, garbage collection, metrics, and that the pprof it
//! serves (and a merge) is read by `go tool pprof`.

mod store_common;

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use kprof_store::{self as store, Digest};
use store_common::*;

#[tokio::test]
async fn upload_dedup_and_read() {
    let s = TestStore::start(1 << 20).await;
    let pprof = sample_pprof(60, 20);
    let d = Digest::of(&pprof);
    let (status, body) = s.upload(&pprof, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["digest"], d.to_string());
    assert_eq!(v["size"], pprof.len());
    assert_eq!(v["url"], s.url(&format!("/v1/artifacts/{d}")));
    // The same content again: 200, nothing rewritten.
    let (status, body) = s.upload(&pprof, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Positive TokenReviews are cached.
    assert_eq!(s.api.lock().unwrap().tokenreviews, 1);
    let (status, headers, bytes) =
        get(&s.url(&format!("/apis/data.kprof.io/v1alpha1/artifacts/{d}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes.as_ref(), pprof.as_slice());
    assert_eq!(headers["content-type"], "application/gzip");
    assert_eq!(headers["etag"], format!("\"{d}\""));
    // Stored where the directory backend puts it.
    assert!(
        s.dir
            .path()
            .join("store/artifacts/sha256")
            .join(d.hex())
            .is_file()
    );
    let (status, _, _) = get(&s.url(&format!(
        "/apis/data.kprof.io/v1alpha1/artifacts/{}",
        Digest::of(b"nope")
    )))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, _, metrics) = get(&s.url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("kprof_store_uploads_total{result=\"created\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kprof_store_uploads_total{result=\"exists\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "kprof_store_upload_bytes_total {}",
            2 * pprof.len()
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_agent_bound_to_a_node_uploads_only_for_namespaces_with_a_pod_there() {
    let s = TestStore::start(1 << 20).await;
    s.api
        .lock()
        .unwrap()
        .pods
        .push(("shop".to_string(), "node-a".to_string()));
    // `upload` names namespace shop, which runs a pod on node-a only.
    let (status, body) = s.upload(&sample_pprof(60, 20), Some(NODE_A_TOKEN)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = s.upload(&sample_pprof(20, 60), Some(NODE_B_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("on node node-b may not upload for namespace shop: it runs no pod there"),
        "{body}"
    );
    // A window's uploads ask once per node and namespace.
    for _ in 0..3 {
        let (status, _) = s.upload(&sample_pprof(60, 20), Some(NODE_A_TOKEN)).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(s.api.lock().unwrap().pod_lists, 2);
    // Without the namespace header, a node-bound uploader is refused.
    let (status, _, body) = request_in(
        http::Method::PUT,
        &s.url(&format!("/v1/artifacts/{}", Digest::of(b"x"))),
        b"x",
        Some(NODE_A_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test]
async fn uploads_need_the_agent_identity() {
    let s = TestStore::start(1 << 20).await;
    let bytes = b"some artifact";
    let (status, body) = s.upload(bytes, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = s.upload(bytes, Some("forged")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("invalid bearer token"), "{body}");
    let (status, body) = s.upload(bytes, Some(OTHER_TOKEN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("system:serviceaccount:shop:default may not upload"),
        "{body}"
    );
    assert!(
        !s.dir
            .path()
            .join("store/artifacts/sha256")
            .join(Digest::of(bytes).hex())
            .exists()
    );
}

#[tokio::test]
async fn digest_mismatch_and_bad_names() {
    let s = TestStore::start(1 << 20).await;
    let other = Digest::of(b"something else");
    let (status, _, body) = put(
        &s.url(&format!("/v1/artifacts/{other}")),
        b"the body",
        Some(AGENT_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("digest mismatch") && body.contains(&Digest::of(b"the body").to_string()),
        "{body}"
    );
    let (status, _, _) = put(&s.url("/v1/artifacts/sha256:1234"), b"x", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) =
        get(&s.url("/apis/data.kprof.io/v1alpha1/artifacts/..%2F..%2Fetc%2Fpasswd")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn size_limit() {
    let s = TestStore::start(64 * 1024).await;
    let big = vec![7u8; 64 * 1024 + 1];
    let (status, body) = s.upload(&big, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body.contains("over the store's limit of 65536 bytes"),
        "{body}"
    );
    let ok = vec![7u8; 64 * 1024];
    let (status, body) = s.upload(&ok, Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn flamegraph_top_and_pprof_by_profile() {
    let s = TestStore::start(1 << 20).await;
    let pprof = sample_pprof(60, 20);
    assert_eq!(
        s.upload(&pprof, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "checkout-cpu-1", Some(&pprof), None);

    // No SVG was uploaded: rendered on read from the pprof.
    let (status, headers, svg) = get(
        &s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/flamegraph")
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&svg));
    assert_eq!(headers["content-type"], "image/svg+xml");
    let svg = String::from_utf8(svg.to_vec()).unwrap();
    assert!(
        svg.contains("<svg")
            && svg.contains("checkout.compute_total")
            && svg.contains("shop/checkout-cpu-1")
    );

    let (status, _, top) = get(
        &s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/top?limit=3")
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
    assert_eq!(top["rows"].as_array().unwrap().len(), 3);
    assert_eq!(top["rows"][0]["function"], "checkout.compute_total");
    assert_eq!(top["rows"][0]["location"], "checkout.py:12");
    assert_eq!(top["unit"], "cpu/nanoseconds");
    let pct = top["rows"][0]["selfPercent"].as_f64().unwrap();
    assert!((pct - 60.0 / 83.0 * 100.0).abs() < 0.01, "{pct}");

    let (status, _, got) =
        get(&s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/pprof"))
            .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.as_ref(), pprof.as_slice());

    // An uploaded SVG is served as is.
    let uploaded = b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"><text>agent svg</text></svg>".to_vec();
    assert_eq!(
        s.upload(&uploaded, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "checkout-cpu-2", Some(&pprof), Some(&uploaded));
    let (_, _, svg) = get(
        &s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-2/flamegraph")
    )
    .await;
    assert_eq!(svg.as_ref(), uploaded.as_slice());

    let (status, _, _) =
        get(&s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/missing/top")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Fuzzing (store_routes): a name no object can have is no Profile (it was a 502: the
    // store's request to the API server with it in the URL did not parse).
    for bad in ["%60", "..", "A%3Fb"] {
        let (status, _, _) = get(&s.url(&format!(
            "/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/{bad}/top"
        )))
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bad}");
    }
    let (status, _, _) = get(&s.url(
        "/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/diff?base=shop/%60",
    ))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Diff and the web pages.
    let pprof2 = sample_pprof(10, 70);
    assert_eq!(
        s.upload(&pprof2, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "checkout-cpu-3", Some(&pprof2), None);
    let (status, _, diff) =
        get(&s.url(
            "/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-3/diff?base=shop/checkout-cpu-1",
        )).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&diff).contains("selectors.select"));
    let (_, _, index) = get(&s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles")).await;
    let index = String::from_utf8_lossy(&index);
    assert!(
        index.contains("href=\"profiles/checkout-cpu-3/ui\"")
            && index.contains("action=\"profiles\""),
        "{index}"
    );
    let (_, _, page) =
        get(&s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/ui"))
            .await;
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("data=\"flamegraph\"") && page.contains("checkout.compute_total"),
        "{page}"
    );
    let (_, _, page) =
        get(&s.url(
        "/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles?a=shop%2Fcheckout-cpu-1&b=shop%2Fcheckout-cpu-3",
    )).await;
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("selectors.select")
            && page.contains("../shop/profiles/checkout-cpu-3/diff?base=shop%2Fcheckout-cpu-1"),
        "{page}"
    );
}

#[tokio::test]
async fn garbage_collection_keeps_referenced_and_young_artifacts() {
    let s = TestStore::start(1 << 20).await;
    let kept = sample_pprof(5, 5);
    let orphan = b"orphaned artifact".to_vec();
    assert_eq!(
        s.upload(&kept, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        s.upload(&orphan, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "p1", Some(&kept), None);
    let artifacts = store::Artifacts::local(&s.dir.path().join("store")).unwrap();

    // Young artifacts survive even when unreferenced.
    let r = store::gc::run_once(&artifacts, &s.client, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!((r.kept, r.young, r.deleted.len()), (1, 1, 0));

    // Past the grace period the orphan goes, the referenced one stays.
    let r = store::gc::run_once(&artifacts, &s.client, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec![Digest::of(&orphan)]);
    assert_eq!(
        get(&s.url(&format!(
            "/apis/data.kprof.io/v1alpha1/artifacts/{}",
            Digest::of(&orphan)
        )))
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&s.url(&format!(
            "/apis/data.kprof.io/v1alpha1/artifacts/{}",
            Digest::of(&kept)
        )))
        .await
        .0,
        StatusCode::OK
    );

    // The Profile is deleted (retention): its artifact goes too.
    s.api.lock().unwrap().profiles.clear();
    let r = store::gc::collect(&artifacts, &HashSet::new(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r.deleted, vec![Digest::of(&kept)]);
}

#[tokio::test]
async fn go_tool_pprof_reads_served_and_merged_profiles() {
    let go = std::path::Path::new("/usr/local/go/bin/go");
    if !go.exists() {
        eprintln!("SKIPPED: go not installed at {}", go.display());
        return;
    }
    let s = TestStore::start(1 << 20).await;
    let pprof = sample_pprof(60, 20);
    s.upload(&pprof, Some(AGENT_TOKEN)).await;
    s.add_profile("shop", "p1", Some(&pprof), None);
    let (_, _, served) =
        get(&s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/p1/pprof")).await;
    let merged = store::pprof::merge(&[
        store::pprof::Profile::decode_bytes(&served).unwrap(),
        store::pprof::Profile::decode_bytes(&sample_pprof(10, 70)).unwrap(),
    ])
    .unwrap()
    .encode_gzip();
    for (name, bytes, hot) in [
        ("served.pb.gz", served.to_vec(), "checkout.compute_total"),
        ("merged.pb.gz", merged, "selectors.select"),
    ] {
        let path = s.dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let out = std::process::Command::new(go)
            .args(["tool", "pprof", "-top", "-sample_index=samples"])
            .arg(&path)
            .env("HOME", s.dir.path())
            .env("PPROF_TMPDIR", s.dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "go tool pprof -top {name}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success());
        let first = stdout
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("flat"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            first.contains(hot),
            "hottest function of {name} should be {hot}: {first}"
        );
    }
}

#[tokio::test]
async fn pyroscope_exporter_pushes_the_pprof() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestStore::start(1 << 20).await;
    let pprof = sample_pprof(60, 20);
    s.add_profile("shop", "p1", Some(&pprof), None);
    let profile = s.api.lock().unwrap().profiles[0].clone();

    // A fake Pyroscope on 127.0.0.1: records one request, answers 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let fake = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len || n == 0 {
                    break;
                }
            }
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        req
    });
    let exporter = store::exporter::Exporter::new(s.client.clone(), s.metrics.clone(), Vec::new());
    let spec = kprof_crds::Exporter {
        kind: kprof_crds::ExporterKind::Pyroscope,
        url,
    };
    exporter
        .push(&spec, &profile, bytes::Bytes::from(pprof.clone()))
        .await
        .unwrap();
    let req = fake.await.unwrap();
    let head =
        String::from_utf8_lossy(&req[..req.windows(4).position(|w| w == b"\r\n\r\n").unwrap()])
            .into_owned();
    let request_line = head.lines().next().unwrap();
    println!("pyroscope got: {request_line}");
    assert!(request_line.starts_with("POST /ingest?name=kprof.cpu%7Bnamespace%3Dshop%2Ctarget%3Dcheckout%2Cpod%3Dcheckout-7d9f"), "{request_line}");
    assert!(
        request_line.contains("&format=pprof&sampleRate=99&spyName=kprof"),
        "{request_line}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: multipart/form-data; boundary="),
        "{head}"
    );
    assert!(
        req.windows(pprof.len()).any(|w| w == pprof.as_slice()),
        "the pprof is in the body"
    );
    assert!(String::from_utf8_lossy(&req).contains("name=\"profile\""));
}
