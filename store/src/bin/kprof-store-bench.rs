//! Benchmark of the profile store, all on 127.0.0.1: upload throughput with N concurrent
//! uploaders (distinct realistic pprof artifacts), serving throughput (artifacts by digest and
//! flame graphs rendered on read) and the process's resident memory.
//!
//! The store runs in this process with a directory backend in a temp dir; the API server is a
//! fake in-process service (TokenReview says "the agent"; one Profile for the render test), so
//! the figures are the store's own cost. RSS is the whole process (store + load generator; the
//! payloads are generated before the baseline is taken).
//!
//! `cargo run --release -p kprof-store --bin kprof-store-bench -- --uploaders 100 --profiles 3000`

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kprof_store::{self as store, Digest, StoreConfig, StoreMetrics};

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent uploaders (and readers).
    #[arg(long, default_value_t = 100)]
    uploaders: usize,
    /// Distinct profiles uploaded in total.
    #[arg(long, default_value_t = 3000)]
    profiles: usize,
    /// Artifact reads in total.
    #[arg(long, default_value_t = 10000)]
    reads: usize,
    /// Flame graphs rendered on read in total.
    #[arg(long, default_value_t = 200)]
    renders: usize,
    /// Distinct stacks per profile (sets the artifact size).
    #[arg(long, default_value_t = 400)]
    stacks: usize,
}

const AGENT: &str = "system:serviceaccount:kprof-system:kprof-agent";

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A Python-like profile: `stacks` distinct stacks, depth 12-30, `seed` makes it unique.
fn profile(seed: usize, stacks: usize) -> Vec<u8> {
    let names: Vec<String> = (0..300)
        .map(|i| format!("service{}.module{}.function_{}", i % 7, i % 31, i))
        .collect();
    let mut owned: Vec<(Vec<&str>, i64)> = Vec::with_capacity(stacks);
    let mut x = (seed as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..stacks {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let depth = 12 + (x >> 33) as usize % 19;
        let mut st = vec!["python", "main"];
        for d in 0..depth {
            st.push(&names[((x >> (d % 40)) as usize + d * 7) % names.len()]);
        }
        owned.push((st, 1 + (x >> 50) as i64 % 50));
    }
    let refs: Vec<(&[&str], i64)> = owned.iter().map(|(s, c)| (s.as_slice(), *c)).collect();
    let mut p = store::pprof::synthetic(
        &refs,
        1_700_000_000_000_000_000 + seed as i64,
        30_000_000_000,
    );
    p.string_table.push(format!("seed {seed}"));
    p.comment.push(p.string_table.len() as i64 - 1);
    p.encode_gzip()
}

fn fake_api(profile_json: Arc<std::sync::Mutex<Option<serde_json::Value>>>) -> kube::Client {
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let profile_json = profile_json.clone();
        async move {
            let path = req.uri().path().to_string();
            let body = if path.ends_with("/tokenreviews") {
                serde_json::json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","metadata":{},"spec":{},
                    "status":{"authenticated":true,"user":{"username":AGENT}}})
            } else {
                profile_json
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or(serde_json::json!({}))
            };
            Ok::<_, Infallible>(http::Response::new(kube::client::Body::from(
                body.to_string().into_bytes(),
            )))
        }
    });
    kube::Client::new(svc, "default")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile_dir()?;
    let profile_json = Arc::new(std::sync::Mutex::new(None));
    let client = fake_api(profile_json.clone());
    let config = StoreConfig::for_dir(dir.join("store"), "127.0.0.1:0".parse()?, AGENT);
    let bound = store::Store::new(config, client, StoreMetrics::default())?
        .bind()
        .await?;
    let addr = bound.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));

    eprintln!(
        "generating {} profiles of {} stacks ...",
        args.profiles, args.stacks
    );
    let payloads: Arc<Vec<(Digest, Bytes)>> = Arc::new(
        (0..args.profiles)
            .map(|i| {
                let b = profile(i, args.stacks);
                (Digest::of(&b), Bytes::from(b))
            })
            .collect(),
    );
    let total_bytes: usize = payloads.iter().map(|(_, b)| b.len()).sum();
    let http: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.uploaders)
        .build_http();
    let rss_base = rss_kib("VmRSS:");

    // Uploads.
    let next = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib("VmRSS:") as usize, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.uploaders {
        let (http, payloads, next) = (http.clone(), payloads.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((d, b)) = payloads.get(i) else { break };
                let req = http::Request::put(format!("http://{addr}/v1/artifacts/{d}"))
                    .header("authorization", "Bearer bench-token")
                    .header("x-kprof-namespace", "bench")
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(b.clone()))
                    .unwrap();
                let res = http.request(req).await.expect("upload");
                if res.status() != http::StatusCode::CREATED {
                    failures += 1;
                }
                let _ = res.into_body().collect().await;
            }
            failures
        }));
    }
    let mut failures = 0;
    for t in tasks {
        failures += t.await?;
    }
    let up = t.elapsed().as_secs_f64();
    let up_peak = peak.swap(0, Ordering::Relaxed);

    // Reads by digest.
    let next = Arc::new(AtomicUsize::new(0));
    let read_bytes = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.uploaders {
        let (http, payloads, next, read_bytes) = (
            http.clone(),
            payloads.clone(),
            next.clone(),
            read_bytes.clone(),
        );
        let reads = args.reads;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reads {
                    break;
                }
                let (d, _) = &payloads[i % payloads.len()];
                let req = http::Request::get(format!(
                    "http://{addr}/apis/data.kprof.io/v1alpha1/artifacts/{d}"
                ))
                .body(Full::new(Bytes::new()))
                .unwrap();
                let res = http.request(req).await.expect("read");
                assert_eq!(res.status(), http::StatusCode::OK);
                let n = res
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes().len())
                    .unwrap_or(0);
                read_bytes.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rd = t.elapsed().as_secs_f64();
    let rd_peak = peak.swap(0, Ordering::Relaxed);

    // Flame graphs rendered on read (one Profile pointing at the first artifact).
    let (d0, b0) = &payloads[0];
    *profile_json.lock().unwrap() = Some(serde_json::json!({
        "apiVersion": "kprof.io/v1alpha1", "kind": "Profile", "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {"target": "t", "pod": "p", "container": "c", "node": "n", "runtime": "cpython 3.12", "profileType": "cpu",
            "windowStart": "2026-01-01T00:00:00Z", "windowEnd": "2026-01-01T00:00:30Z", "sampleHz": 99, "samples": 1,
            "artifacts": {"pprof": {"url": format!("http://x/v1/artifacts/{d0}"), "digest": d0.to_string(), "sizeBytes": b0.len()}}}
    }));
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.uploaders.min(8) {
        let (http, next) = (http.clone(), next.clone());
        let renders = args.renders;
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < renders {
                let req = http::Request::get(format!(
                    "http://{addr}/apis/data.kprof.io/v1alpha1/namespaces/bench/profiles/bench/flamegraph"
                ))
                .body(Full::new(Bytes::new()))
                .unwrap();
                let res = http.request(req).await.expect("render");
                assert_eq!(res.status(), http::StatusCode::OK);
                let _ = res.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rn = t.elapsed().as_secs_f64();
    sampler.abort();

    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "kprof-store-bench ({} concurrent clients, 127.0.0.1, directory backend)",
        args.uploaders
    );
    println!(
        "artifacts:  {} profiles, {:.1} KB average, {:.1} MB total",
        payloads.len(),
        total_bytes as f64 / payloads.len() as f64 / 1e3,
        mb(total_bytes)
    );
    println!(
        "upload:     {:.0} profiles/s, {:.1} MB/s ({:.2}s, {failures} not 201)",
        payloads.len() as f64 / up,
        mb(total_bytes) / up,
        up
    );
    let rb = read_bytes.load(Ordering::Relaxed);
    println!(
        "serve:      {:.0} reads/s, {:.1} MB/s ({} reads, {:.2}s)",
        args.reads as f64 / rd,
        mb(rb) / rd,
        args.reads,
        rd
    );
    println!(
        "render:     {:.1} flame graphs/s on read ({:.0} stacks each)",
        args.renders as f64 / rn,
        args.stacks as f64
    );
    println!(
        "RSS (whole process): baseline {:.1} MiB, peak during uploads {:.1} MiB, during reads {:.1} MiB, high-water {:.1} MiB",
        rss_base as f64 / 1024.0,
        up_peak as f64 / 1024.0,
        rd_peak as f64 / 1024.0,
        rss_kib("VmHWM:") as f64 / 1024.0
    );
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("kprof-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
