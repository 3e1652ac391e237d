//! The store's web page renders a flame graph in headless Chromium: a screenshot of a profile's
//! page must show the flame graph's colours. Skips loudly when Chromium is not installed
//! (`apt-get install -y chromium`); set `KPROF_REQUIRE_CHROMIUM=1` to fail instead.

mod store_common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use http::StatusCode;
use store_common::*;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|c| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(c))
                    .find(|f| f.is_file())
            })
        })
}

/// Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into RGB pixels.
fn decode_png(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut pos, mut w, mut h, mut channels, mut idat) = (8, 0usize, 0usize, 0usize, Vec::new());
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = &bytes[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    t => panic!("colour type {t}"),
                };
                assert_eq!(data[12], 0, "interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        pos += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(idat.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w * channels;
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity(w * h);
    for y in 0..h {
        let line = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
        let (filter, src) = (line[0], &line[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels {
                cur[i - channels] as i16
            } else {
                0
            };
            let b = prev[i] as i16;
            let c = if i >= channels {
                prev[i - channels] as i16
            } else {
                0
            };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("filter {f}"),
            };
            cur[i] = src[i].wrapping_add(pred as u8);
        }
        pixels.extend(cur.chunks(channels).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    (w, h, pixels)
}

fn screenshot(browser: &Path, url: &str, out: &Path) {
    let profile_dir = tempfile::tempdir().unwrap();
    let status = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.path().display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "chromium failed for {url}");
}

/// Share of pixels in the flame graph's "hot" palette (red/orange/yellow: r high, b low).
fn flame_share(pixels: &[[u8; 3]]) -> f64 {
    let hot = pixels
        .iter()
        .filter(|[r, g, b]| *r >= 195 && *b <= 80 && *g <= 235)
        .count();
    hot as f64 / pixels.len() as f64
}

/// Share of pixels a differential flame graph paints: red (grew) or blue (shrank).
fn diff_share(pixels: &[[u8; 3]]) -> f64 {
    let n = pixels
        .iter()
        .filter(|[r, g, b]| {
            (*r >= 200 && *g <= 140 && *b <= 140) || (*b >= 200 && *r <= 140 && *g <= 140)
        })
        .count();
    n as f64 / pixels.len() as f64
}

#[tokio::test]
async fn web_page_renders_the_flame_graph_in_chromium() {
    let Some(browser) = chromium() else {
        if std::env::var("KPROF_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("KPROF_REQUIRE_CHROMIUM=1 but chromium is not installed");
        }
        eprintln!("SKIPPED: chromium is not installed (apt-get install -y chromium)");
        return;
    };
    let s = TestStore::start(1 << 20).await;
    let pprof = sample_pprof(60, 20);
    assert_eq!(
        s.upload(&pprof, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "checkout-cpu-1", Some(&pprof), None);
    let pprof2 = sample_pprof(10, 70);
    assert_eq!(
        s.upload(&pprof2, Some(AGENT_TOKEN)).await.0,
        StatusCode::CREATED
    );
    s.add_profile("shop", "checkout-cpu-2", Some(&pprof2), None);

    let out_dir = std::env::var_os("KPROF_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("kprof-screenshots"));
    std::fs::create_dir_all(&out_dir).unwrap();

    // Chromium is blocking: run it on a blocking thread while the store keeps serving.
    let shots = [
        (
            "profile",
            s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles/checkout-cpu-1/ui"),
            flame_share as fn(&[[u8; 3]]) -> f64,
            0.02,
        ),
        (
            "diff",
            s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles?a=shop%2Fcheckout-cpu-1&b=shop%2Fcheckout-cpu-2"),
            diff_share,
            0.01,
        ),
        ("index", s.url("/apis/data.kprof.io/v1alpha1/namespaces/shop/profiles"), flame_share, -1.0),
    ];
    for (name, url, measure, min_share) in shots {
        let png = out_dir.join(format!("store-web-{name}.png"));
        let _ = std::fs::remove_file(&png);
        let (b, u, p) = (browser.clone(), url.clone(), png.clone());
        tokio::task::spawn_blocking(move || screenshot(&b, &u, &p))
            .await
            .unwrap();
        let bytes = std::fs::read(&png)
            .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
        let (w, h, pixels) = decode_png(&bytes);
        let distinct: std::collections::HashSet<[u8; 3]> = pixels.iter().copied().collect();
        let share = measure(&pixels);
        println!(
            "screenshot {name}: {} ({w}x{h}, {} colours, {:.1}% flame-graph-coloured) of {url}",
            png.display(),
            distinct.len(),
            share * 100.0
        );
        assert!(
            distinct.len() > 20,
            "{name}: the screenshot is blank ({} colours)",
            distinct.len()
        );
        if min_share > 0.0 {
            assert!(
                share >= min_share,
                "{name}: only {:.2}% of the screenshot has flame graph colours",
                share * 100.0
            );
        }
    }
}
