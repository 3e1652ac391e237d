//! Kernel tests of memory profiles: the real eBPF memory source (sampled page faults, the
//! releases and growth records of `sys_exit`) through `kprof_agent::record`, the same session as
//! `kprof-agent record --types memory`, against every installed CPython (pyenv 3.8–3.13, the
//! built 3.14, the distribution's 3.11 and a C program embedding its libpython).
//!
//! The workload (`workloads/python/memory.py`) measures its own truth: the anonymous resident
//! memory each part added (`/proc/self/status`) — a cache it builds and keeps, byte buffers it
//! keeps, a slow leak — while a churner allocates and frees far more. The in-use view must rank
//! the keepers above the churner and give each big keeper its measured bytes within ±25 %; the
//! allocation view must show the churner (touching far more than it holds); the leak must be
//! flagged with the leaking function among the stacks that grew it; the mapped in-use view
//! (the growth records) must give each keeper its bytes within ±25 % too, and
//! show the churner mapping far more than it holds; the heap usage read must
//! match `/proc` within 5 %, and the Python object heap the interpreter's own arena count.
//!
//! Needs root and the eBPF object; otherwise it prints `SKIP` and passes — unless
//! `KPROF_REQUIRE_KERNEL=1`, which turns a skip into a failure.
//!
//!   sudo -E cargo test -p kprof-agent --test python_memory -- --nocapture --test-threads 1

#[path = "workloads/python/harness.rs"]
mod harness;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kprof_agent::profile::{AggregatedProfile, FrameKind, ProfileKind, SampleKey};
use kprof_agent::record::{ProfileType, RecordOptions, record};

/// What the workload measured (bytes of anonymous resident memory).
#[derive(Debug, serde::Deserialize)]
struct Truth {
    build_cache: i64,
    keep_buffers: i64,
    leak_step: i64,
    churn_rounds: u64,
    /// (CLOCK_MONOTONIC seconds, anonymous bytes, pymalloc arenas) read by the program:
    /// before, during and after each round of the churner (its memory comes and goes).
    readings: Vec<(f64, u64, i64)>,
    arena_bytes: u64,
}

/// Whether `key`'s stack runs the workload's function `name` (Python frames are named
/// `module.function`; the embedding program's script module has another name).
fn runs(key: &SampleKey, name: &str) -> bool {
    key.stack.iter().any(|f| {
        f.kind == FrameKind::Python
            && (&*f.function == name || f.function.ends_with(&format!(".{name}")))
    })
}

/// (alloc bytes, in-use bytes) of the stacks that run `name`.
fn bytes_of(p: &AggregatedProfile, name: &str) -> (u64, u64) {
    p.samples
        .keys()
        .filter(|k| runs(k, name))
        .fold((0, 0), |(a, u), k| (a + p.value_of(k), u + p.inuse_of(k)))
}

/// (mapped bytes, mapped in-use bytes) of the stacks that run `name`.
fn mapped_bytes_of(p: &AggregatedProfile, name: &str) -> (u64, u64) {
    p.samples
        .keys()
        .filter(|k| runs(k, name))
        .fold((0, 0), |(m, u), k| {
            let ((_, mapped), (_, held)) = p.mapped_of(k);
            (m + mapped, u + held)
        })
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn check(interp: &harness::Interp, dir: &Path) -> Result<String, String> {
    let truth_path = dir.join("truth.json");
    let mut command = vec![interp.path.to_string_lossy().to_string()];
    command.extend(interp.pre_args.iter().cloned());
    command.push(harness::script("memory.py").to_string_lossy().to_string());
    command.push(truth_path.to_string_lossy().to_string());
    let opts = RecordOptions {
        command,
        duration: Duration::from_secs(8),
        progress: false,
        types: vec![ProfileType::Memory],
        ..RecordOptions::default()
    };
    let rec = record(&opts, &AtomicBool::new(false)).map_err(|e| format!("record: {e}"))?;
    let text = std::fs::read_to_string(&truth_path).map_err(|e| format!("truth: {e}"))?;
    let truth: Truth = serde_json::from_str(&text).map_err(|e| format!("truth: {e}"))?;
    let p = rec
        .of_type(ProfileType::Memory)
        .ok_or("no memory profile")?;
    if !matches!(p.kind, ProfileKind::Memory { .. }) {
        return Err(format!("a {} profile, not memory", p.kind.name()));
    }
    let report = p.memory.as_ref().ok_or("no memory report")?;
    // Allocation probes are on demand only.
    if !report.probed.is_empty() || !report.probed_inuse.is_empty() {
        return Err("allocations were probed without --alloc-probes".into());
    }
    let cache = bytes_of(p, "build_cache");
    let buffers = bytes_of(p, "keep_buffers");
    let churn = bytes_of(p, "churn");
    let leak = bytes_of(p, "leak_step");
    let mapped =
        ["build_cache", "keep_buffers", "churn", "leak_step"].map(|f| mapped_bytes_of(p, f));
    let mapped_figures = format!(
        "mapped (window/held): cache {:.1}/{:.1} MiB, buffers {:.1}/{:.1}, churn {:.1}/{:.1}, leak {:.1}/{:.1}",
        mib(mapped[0].0),
        mib(mapped[0].1),
        mib(mapped[1].0),
        mib(mapped[1].1),
        mib(mapped[2].0),
        mib(mapped[2].1),
        mib(mapped[3].0),
        mib(mapped[3].1)
    );
    let figures = format!(
        "in use: cache {:.1}/{:.1} MiB, buffers {:.1}/{:.1}, leak {:.1}/{:.1}, churn {:.1}; \
         alloc: churn {:.1} MiB in {} rounds, cache {:.1}",
        mib(cache.1),
        mib(truth.build_cache.max(0) as u64),
        mib(buffers.1),
        mib(truth.keep_buffers.max(0) as u64),
        mib(leak.1),
        mib(truth.leak_step.max(0) as u64),
        mib(churn.1),
        mib(churn.0),
        truth.churn_rounds,
        mib(cache.0),
    );
    let within = |got: u64, want: i64, what: &str| -> Result<(), String> {
        let ratio = got as f64 / want.max(1) as f64;
        if (0.75..=1.25).contains(&ratio) {
            Ok(())
        } else {
            Err(format!(
                "{what}: {:.1} MiB in use against {:.1} MiB measured ({ratio:.2}×); {figures}",
                mib(got),
                want as f64 / f64::from(1 << 20)
            ))
        }
    };
    within(cache.1, truth.build_cache, "the cache")?;
    within(buffers.1, truth.keep_buffers, "the buffers")?;
    // The growth records (exact, not sampled): the arenas and blocks each keeper had mapped
    // and still holds; the churner mapped far more than it holds. (The leak's small blocks
    // land in heap memory others grew: reuse is invisible to this view.)
    let [m_cache, m_buffers, m_churn, _] = mapped;
    within(m_cache.1, truth.build_cache, "the cache's mappings")
        .and_then(|()| within(m_buffers.1, truth.keep_buffers, "the buffers' mappings"))
        .map_err(|e| format!("{e}; {mapped_figures}"))?;
    if m_cache.1 <= m_churn.1 || m_buffers.1 <= m_churn.1 || m_churn.0 < 3 * m_churn.1.max(1) {
        return Err(format!(
            "the mapped views do not tell the keepers from the churner; {mapped_figures}"
        ));
    }
    if cache.1 <= churn.1 || buffers.1 <= churn.1 {
        return Err(format!("the churner holds as much as a keeper; {figures}"));
    }
    // The churner touches far more than it holds, and more than the buffers and the leak. It
    // comes before the cache too where its arenas go back to the kernel each round (3.8–3.11);
    // CPython 3.12+ keeps reusing them, so its memory is touched afresh less often than it is
    // allocated (first touches are what this view counts).
    if churn.0 < 3 * churn.1.max(1)
        || churn.0 <= buffers.0
        || churn.0 <= leak.0
        || churn.0 * 2 < cache.0
    {
        return Err(format!(
            "the allocation view does not show the churner; {figures}"
        ));
    }
    // The workload's own process (the embedding program and python are one process).
    let usage = report
        .processes
        .iter()
        .max_by_key(|u| u.end().map_or(0, |m| m.anon))
        .ok_or("no process memory read")?;
    // The last reading against what the program read in /proc over the second before it.
    let &(at_ns, end) = usage.series.last().ok_or("no reading")?;
    let at = at_ns as f64 / 1e9;
    let near: Vec<u64> = truth
        .readings
        .iter()
        .filter(|(t, _, _)| (at - 1.0..=at + 0.05).contains(t))
        .map(|r| r.1)
        .collect();
    let (lo, hi) = (
        near.iter()
            .copied()
            .min()
            .ok_or("no /proc reading of the program's near the end")?,
        near.iter().copied().max().unwrap_or(0),
    );
    let heap_ratio = end.anon as f64 / lo.max(1) as f64;
    if end.anon as f64 * 1.05 < lo as f64 || end.anon as f64 > hi as f64 * 1.05 {
        return Err(format!(
            "heap read {:.1} MiB; the program read {:.1}–{:.1} MiB in /proc in the second before",
            mib(end.anon),
            mib(lo),
            mib(hi)
        ));
    }
    // The Python object heap (pymalloc's arenas) against the interpreter's own count, where the
    // build has the symbols to find it (pyenv and the built 3.14); else a warning says why.
    let heap_figure = match usage.runtime_heap.last() {
        Some(&(t_ns, bytes)) => {
            let t = t_ns as f64 / 1e9;
            let arenas: Vec<u64> = truth
                .readings
                .iter()
                .filter(|(rt, _, a)| (t - 1.0..=t + 0.05).contains(rt) && *a >= 0)
                .map(|r| r.2 as u64 * truth.arena_bytes)
                .collect();
            let (lo, hi) = (
                arenas
                    .iter()
                    .copied()
                    .min()
                    .ok_or("no arena count of the program's")?,
                arenas.iter().copied().max().unwrap_or(0),
            );
            if (bytes as f64) < lo as f64 * 0.95 || bytes as f64 > hi as f64 * 1.05 {
                return Err(format!(
                    "Python heap read {:.1} MiB; the interpreter counted {:.1}–{:.1} MiB of arenas",
                    mib(bytes),
                    mib(lo),
                    mib(hi)
                ));
            }
            format!("python heap {:.0} MiB", mib(bytes))
        }
        None => {
            let said = p
                .warnings
                .iter()
                .any(|w| w.contains("Python object heap cannot be read"));
            if !said {
                return Err("no Python heap read and no warning why".into());
            }
            if interp.name.starts_with("pyenv-") || interp.name.starts_with("built-") {
                return Err(format!(
                    "the Python heap of an unstripped build was not read: {:?}",
                    p.warnings
                ));
            }
            "python heap unreadable (warned)".to_owned()
        }
    };
    let leak_flag = report
        .leaks
        .iter()
        .find(|l| l.pid == usage.pid)
        .ok_or_else(|| format!("the leak was not flagged; series {:?}", anon_series(usage)))?;
    let named = leak_flag.grown_by.iter().any(|(stack, _)| {
        stack
            .iter()
            .any(|f| f.kind == FrameKind::Python && f.function.ends_with("leak_step"))
    });
    if !named {
        return Err(format!(
            "the leak's stacks do not name leak_step: {}; {figures}; {mapped_figures}",
            leak_flag.message()
        ));
    }
    Ok(format!(
        "{figures}; {mapped_figures}; heap {heap_ratio:.3}× the least /proc reading; \
         {heap_figure}; leak flagged"
    ))
}

fn anon_series(u: &kprof_agent::profile::memory::ProcessUsage) -> Vec<u64> {
    u.series.iter().map(|(_, m)| m.anon >> 20).collect()
}

#[test]
fn memory_in_use_alloc_and_leaks_match_what_the_program_measured_on_every_interpreter() {
    if !harness::kernel_or_skip("python_memory") {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut failed = Vec::new();
    for interp in &interps {
        // Names from KPROF_PYTHONS are paths.
        let sub = dir.path().join(interp.name.replace('/', "_"));
        std::fs::create_dir_all(&sub).expect("temporary directory");
        match check(interp, &sub) {
            Ok(summary) => println!("ok    {:<24} {summary}", interp.name),
            Err(e) => {
                println!("FAIL  {:<24} {e}", interp.name);
                failed.push(interp.name.clone());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "memory profiles wrong on: {}",
        failed.join(", ")
    );
}
