//! Kernel tests of the Python support: the real eBPF sampler (`kprof_agent::record`, the same
//! session as `kprof-agent record`) on this machine's kernel, against every installed CPython
//! (pyenv 3.8–3.13 with `libpython3.X.so`, a static 3.14 built by `e2e/testbed/build-cpython.sh`,
//! the distribution's static `/usr/bin/python3.X`, and a C program embedding the distribution's
//! shared libpython).
//!
//! Needs root and the eBPF object; otherwise every test prints `SKIP` with the reason and
//! passes — unless `KPROF_REQUIRE_KERNEL=1`, which turns a skip into a failure.
//!
//!   sudo -E cargo test -p kprof-agent --test python_kernel -- --nocapture --test-threads 1

#[path = "workloads/python/harness.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kprof_agent::profile::{AggregatedProfile, Frame, FrameKind, ThreadState, WaitClass};
use kprof_agent::record::{ProfileType, RecordOptions, record};
use kprof_common::python::PyStat;

fn record_cmd(
    interp: &harness::Interp,
    script: &str,
    args: &[&str],
    secs: u64,
    hz: u32,
) -> kprof_agent::record::Recording {
    record_cmd_clock(interp, script, args, secs, hz, true)
}

/// `record_cmd` with the sampling clock's jitter on or off.
fn record_cmd_clock(
    interp: &harness::Interp,
    script: &str,
    args: &[&str],
    secs: u64,
    hz: u32,
    clock_jitter: bool,
) -> kprof_agent::record::Recording {
    record_cmd_with(
        interp,
        script,
        args,
        secs,
        hz,
        clock_jitter,
        vec![ProfileType::Cpu],
    )
}

/// `record_cmd` with any settings.
fn record_cmd_with(
    interp: &harness::Interp,
    script: &str,
    args: &[&str],
    secs: u64,
    hz: u32,
    clock_jitter: bool,
    types: Vec<ProfileType>,
) -> kprof_agent::record::Recording {
    let mut command = vec![interp.path.to_string_lossy().to_string()];
    command.extend(interp.pre_args.iter().cloned());
    command.push(harness::script(script).to_string_lossy().to_string());
    command.extend(args.iter().map(|s| s.to_string()));
    let opts = RecordOptions {
        command,
        duration: Duration::from_secs(secs),
        sample_hz: hz,
        follow_children: true,
        python: true,
        progress: false,
        clock_jitter,
        types,
        ..RecordOptions::default()
    };
    let stop = AtomicBool::new(false);
    record(&opts, &stop).unwrap_or_else(|e| panic!("{}: record failed: {e}", interp.name))
}

fn py_frames(stack: &[Frame]) -> Vec<&Frame> {
    stack
        .iter()
        .filter(|f| f.kind == FrameKind::Python)
        .collect()
}

const CATEGORIES: [(&str, f64); 4] = [
    ("recursive", 40.0),
    ("method", 25.0),
    ("generator", 15.0),
    ("compress", 20.0),
];

fn category(stack: &[Frame]) -> Option<&'static str> {
    for f in stack.iter().rev() {
        match &*f.function {
            "split.spin_recursive" => return Some("recursive"),
            "split.Shape.method_work" | "split.method_work" => return Some("method"),
            "split.generator_work" => return Some("generator"),
            "split.compress_work" => return Some("compress"),
            _ => {}
        }
    }
    None
}

/// Per-category share, hot-line correctness and the GIL-released check for one process set.
struct Attribution {
    total: u64,
    uncategorized: u64,
    counts: BTreeMap<&'static str, u64>,
    /// Samples whose innermost Python frame is on the category's hot line.
    hot_ok: BTreeMap<&'static str, u64>,
    /// compress samples with a libz native leaf under the Python caller.
    compress_native_under_py: u64,
    runtime: Vec<String>,
    warnings: Vec<String>,
    /// The most frequent stacks without a category (diagnostics).
    uncategorized_top: Vec<(u64, String)>,
}

fn attribute(p: &AggregatedProfile, pids: Option<&[u32]>) -> Attribution {
    let m = harness::markers("split.py");
    let mut a = Attribution {
        total: 0,
        uncategorized: 0,
        counts: BTreeMap::new(),
        hot_ok: BTreeMap::new(),
        compress_native_under_py: 0,
        runtime: p
            .processes
            .values()
            .filter_map(|pm| pm.runtime.clone())
            .collect(),
        warnings: p.warnings.clone(),
        uncategorized_top: Vec::new(),
    };
    for (key, &n) in &p.samples {
        if pids.is_some_and(|pids| !pids.contains(&key.pid)) {
            continue;
        }
        a.total += n;
        let Some(cat) = category(&key.stack) else {
            a.uncategorized += n;
            let s: Vec<String> = key
                .stack
                .iter()
                .take(12)
                .map(|f| match f.module.as_deref() {
                    Some(m) => format!("{}@{}", f.function, m.rsplit('/').next().unwrap_or(m)),
                    None => f.function.to_string(),
                })
                .collect();
            a.uncategorized_top
                .push((n, format!("[{}] {}", key.thread, s.join(" <- "))));
            continue;
        };
        *a.counts.entry(cat).or_default() += n;
        let py = py_frames(&key.stack);
        let leaf = py.first().map(|f| (f.function.to_string(), f.line));
        let hot = match (cat, &leaf) {
            ("recursive", Some((f, l))) => f == "split.spin_recursive" && *l == m["rec_hot"],
            ("method", Some((f, l))) => f.ends_with("closure") && *l == m["closure_hot"],
            ("generator", Some((f, l))) => {
                (f == "split.gen" && *l == m["gen_hot"])
                    || (f == "split.generator_work" && *l == m["gen_consume"])
            }
            ("compress", Some((f, l))) => f == "split.compress_work" && *l == m["compress_hot"],
            _ => false,
        };
        if hot {
            *a.hot_ok.entry(cat).or_default() += n;
        }
        if cat == "compress" {
            let first_py = key
                .stack
                .iter()
                .position(|f| f.kind == FrameKind::Python)
                .unwrap_or(0);
            let native_libz = key.stack[..first_py].iter().any(|f| {
                f.kind == FrameKind::Native
                    && (f.module.as_deref().is_some_and(|m| m.contains("libz"))
                        || f.function.contains("deflate"))
            });
            if native_libz {
                a.compress_native_under_py += n;
            }
        }
    }
    a
}

/// Checks against the truth; returns (report line, errors).
fn judge(name: &str, a: &Attribution, tolerance_pp: f64) -> (String, Vec<String>) {
    let mut errs = Vec::new();
    let cat_total: u64 = a.counts.values().sum();
    let mut line = format!(
        "{name:<22} samples={:<5} uncategorized={:>4.1}%",
        a.total,
        100.0 * a.uncategorized as f64 / a.total.max(1) as f64
    );
    if cat_total < 200 {
        errs.push(format!("too few categorized samples: {cat_total}"));
    }
    let mut worst: f64 = 0.0;
    for (cat, truth) in CATEGORIES {
        let n = a.counts.get(cat).copied().unwrap_or(0);
        let share = 100.0 * n as f64 / cat_total.max(1) as f64;
        let err = share - truth;
        worst = worst.max(err.abs());
        let hot = 100.0 * a.hot_ok.get(cat).copied().unwrap_or(0) as f64 / n.max(1) as f64;
        line.push_str(&format!("  {cat}={share:.1}%({err:+.1}) hot={hot:.0}%"));
        if err.abs() > tolerance_pp {
            errs.push(format!(
                "{cat}: {share:.1}% vs truth {truth}% (±{tolerance_pp})"
            ));
        }
        if hot < 80.0 {
            errs.push(format!("{cat}: only {hot:.0}% of samples on the hot line"));
        }
    }
    let comp = a.counts.get("compress").copied().unwrap_or(0);
    let gil = 100.0 * a.compress_native_under_py as f64 / comp.max(1) as f64;
    line.push_str(&format!(
        "  worst={worst:.1}pp zlib-native-under-python={gil:.0}% runtime={:?}",
        a.runtime
    ));
    // Typically 63–88 %; the rest is time in glibc (malloc, memcpy) and page faults under it,
    // where glibc's missing frame pointers cut the native walk before libz (issue #15). Runs
    // where the heap is trimmed and re-faulted put 43–45 % there (seen on 3.9 and 3.12 on a
    // quiet machine), so the bound proves the merge (0 % when native frames are not spliced
    // under the Python caller), not glibc's layout.
    if gil < 30.0 {
        errs.push(format!(
            "only {gil:.0}% of compress samples show libz under the Python caller"
        ));
    }
    (line, errs)
}

#[test]
fn attribution_every_version() {
    if !harness::kernel_or_skip("attribution_every_version") {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for interp in interps {
        let rec = record_cmd(&interp, "split.py", &["12"], 12, 499);
        let a = attribute(rec.profile(), None);
        let (mut line, mut errs) = judge(&interp.name, &a, 5.0);
        // The walker's own counters (summary.json, metrics) agree: nearly every sample of this
        // all-Python process was walked, with several frames each.
        let py = |s: PyStat| rec.stats.python[s as usize];
        let walked = py(PyStat::Walks).saturating_sub(
            py(PyStat::NoThreadState) + py(PyStat::TsdReadErr) + py(PyStat::NoFrame),
        );
        let walked_pct = 100.0 * walked as f64 / rec.stats.events.max(1) as f64;
        line.push_str(&format!(
            " walked={walked_pct:.1}% frame_read_err={}",
            py(PyStat::FrameReadErr)
        ));
        if walked_pct < 90.0 || py(PyStat::Frames) < 3 * walked {
            errs.push(format!(
                "walker counters: {:?} of {} samples",
                rec.stats.python, rec.stats.events
            ));
        }
        eprintln!("{}{line}", if errs.is_empty() { "PASS " } else { "FAIL " });
        if !errs.is_empty() {
            eprintln!("      {errs:?} warnings={:?}", a.warnings);
            let mut top = a.uncategorized_top.clone();
            top.sort_by_key(|x| std::cmp::Reverse(x.0));
            for (n, s) in top.iter().take(5) {
                eprintln!("      uncategorized {n}: {}", &s[..s.len().min(400)]);
            }
            failures.push(interp.name.clone());
        }
        report.push(line);
    }
    assert!(failures.is_empty(), "attribution failed for {failures:?}");
}

#[test]
fn threads_have_their_own_stacks_and_names() {
    if !harness::kernel_or_skip("threads_have_their_own_stacks_and_names") {
        return;
    }
    let m = harness::markers("threads.py");
    let mut failures = Vec::new();
    for interp in harness::interpreters() {
        let p = record_cmd(&interp, "threads.py", &["30"], 6, 199)
            .profiles
            .remove(0);
        // thread → (samples, samples with Python frames, samples with the expected stack)
        let mut by_thread: HashMap<String, (u64, u64, u64)> = HashMap::new();
        for (key, &n) in &p.samples {
            let py = py_frames(&key.stack);
            let sig: Vec<(String, u32)> = py
                .iter()
                .map(|f| (f.function.to_string(), f.line))
                .collect();
            let ok = match &*key.thread {
                "py-busy" => {
                    sig.first()
                        .is_some_and(|(f, l)| f == "threads.leaf" && *l == m["leaf"])
                        && sig
                            .iter()
                            .any(|(f, l)| f == "threads.busy" && *l == m["busy"])
                }
                "py-zlib" => sig
                    .first()
                    .is_some_and(|(f, l)| f == "threads.compress_loop" && *l == m["compress"]),
                _ => true,
            };
            let e = by_thread.entry(key.thread.to_string()).or_default();
            e.0 += n;
            if !py.is_empty() {
                e.1 += n;
            }
            if ok {
                e.2 += n;
            }
        }
        // (samples, % with Python frames, % of those with the expected stack)
        let share = |t: &str| {
            by_thread
                .get(t)
                .map(|(n, py, ok)| {
                    (
                        *n,
                        100.0 * *py as f64 / (*n).max(1) as f64,
                        100.0 * *ok as f64 / (*py).max(1) as f64,
                    )
                })
                .unwrap_or((0, 0.0, 0.0))
        };
        let (nb, pyb, okb) = share("py-busy");
        let (nz, pyz, okz) = share("py-zlib");
        // Samples taken before the agent registered the process (interpreter start-up) have
        // no Python frames: coverage is checked separately from correctness.
        let pass = nb >= 50 && nz >= 50 && pyb >= 80.0 && pyz >= 80.0 && okb >= 95.0 && okz >= 95.0;
        eprintln!(
            "{} {:<22} py-busy: {nb} samples, {pyb:.0}% with python, {okb:.0}% of them busy->K.meth->leaf@{}   py-zlib: {nz} samples, {pyz:.0}% with python, {okz:.0}% of them compress_loop@{}   threads={:?}",
            if pass { "PASS" } else { "FAIL" },
            interp.name,
            m["leaf"],
            m["compress"],
            by_thread.keys().collect::<Vec<_>>()
        );
        if !pass {
            failures.push(interp.name.clone());
        }
    }
    assert!(failures.is_empty(), "threads failed for {failures:?}");
}

#[test]
fn multiprocessing_workers_are_profiled() {
    if !harness::kernel_or_skip("multiprocessing_workers_are_profiled") {
        return;
    }
    let mut failures = Vec::new();
    for interp in harness::interpreters() {
        let p = record_cmd(&interp, "split.py", &["8", "--mp", "2"], 9, 299)
            .profiles
            .remove(0);
        let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
        for (key, &n) in &p.samples {
            if category(&key.stack).is_some() {
                *per_pid.entry(key.pid).or_default() += n;
            }
        }
        let workers: Vec<u32> = per_pid
            .iter()
            .filter(|(_, n)| **n >= 50)
            .map(|(p, _)| *p)
            .collect();
        let mut errs = Vec::new();
        if workers.len() < 2 {
            errs.push(format!("expected 2 profiled workers, got {per_pid:?}"));
        }
        let mut line = String::new();
        for w in &workers {
            let a = attribute(&p, Some(&[*w]));
            let (l, e) = judge(&format!("  worker {w}"), &a, 8.0);
            // Workers are walked from their first sample (the pool forks them before the
            // parent's first look; they are adopted when the parent is found): only start-up
            // and exit may lack Python frames.
            let (mut all, mut native_only) = (0, 0);
            for (key, &n) in p.samples.iter().filter(|(k, _)| k.pid == *w) {
                all += n;
                if py_frames(&key.stack).is_empty() {
                    native_only += n;
                }
            }
            let native_pct = 100.0 * native_only as f64 / all.max(1) as f64;
            line.push_str(&format!("\n      {l} without-python={native_pct:.1}%"));
            if native_pct > 5.0 {
                errs.push(format!(
                    "worker {w}: {native_pct:.1}% of its samples have no Python frames"
                ));
            }
            let mut top = a.uncategorized_top.clone();
            top.sort_by_key(|x| std::cmp::Reverse(x.0));
            for (n, s) in top.iter().take(3) {
                line.push_str(&format!(
                    "\n          uncategorized {n}: {}",
                    &s[..s.len().min(300)]
                ));
            }
            // Per worker the compress samples are few: the libz-under-Python share is checked in
            // `attribution_every_version`.
            errs.extend(
                e.into_iter()
                    .filter(|e| !e.starts_with("too few") && !e.contains("libz")),
            );
        }
        eprintln!(
            "{} {:<22} workers={:?}{line}",
            if errs.is_empty() { "PASS" } else { "FAIL" },
            interp.name,
            per_pid
        );
        if !errs.is_empty() {
            eprintln!("      {errs:?}");
            failures.push(interp.name.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "multiprocessing failed for {failures:?}"
    );
}

/// 100-deep stacks are captured whole; 200-deep ones keep their innermost 128 frames and end
/// with the truncation marker.
#[test]
fn deep_stacks_and_truncation() {
    if !harness::kernel_or_skip("deep_stacks_and_truncation") {
        return;
    }
    let m = harness::markers("deep.py");
    let mut failures = Vec::new();
    for interp in harness::interpreters() {
        for (depth, expect_truncated) in [(100u32, false), (200, true)] {
            let secs = "30".to_string();
            let p = record_cmd(&interp, "deep.py", &[&depth.to_string(), &secs], 3, 199)
                .profiles
                .remove(0);
            let (mut total, mut good) = (0u64, 0u64);
            for (key, &n) in &p.samples {
                let py = py_frames(&key.stack);
                if py.is_empty() {
                    continue;
                }
                total += n;
                let leaf_ok = py[0].function.as_ref() == "deep.spin" && py[0].line == m["spin"];
                let downs = py
                    .iter()
                    .filter(|f| f.function.as_ref() == "deep.down" && f.line == m["down"])
                    .count();
                let truncated = key
                    .stack
                    .last()
                    .is_some_and(|f| f.function.as_ref() == "[truncated python stack]");
                let ok = if expect_truncated {
                    // spin + down(0) at `bottom` + 126 × down at `down`, then the marker.
                    truncated && py.len() == 129 && downs == 126
                } else {
                    !truncated
                        && downs == depth as usize
                        && py.iter().any(|f| f.function.as_ref() == "deep.<module>")
                };
                if leaf_ok && ok {
                    good += n;
                }
            }
            let pct = 100.0 * good as f64 / total.max(1) as f64;
            let pass = total >= 30 && pct >= 95.0;
            eprintln!(
                "{} {:<22} depth {depth}: {total} samples with python, {pct:.0}% complete{}",
                if pass { "PASS" } else { "FAIL" },
                interp.name,
                if expect_truncated {
                    " and marked truncated"
                } else {
                    ""
                }
            );
            if !pass {
                failures.push(format!("{} depth {depth}", interp.name));
            }
        }
    }
    assert!(failures.is_empty(), "deep stacks failed for {failures:?}");
}

/// A shell that `exec`s CPython (the usual `sh -c "… ; exec python app.py"` container command):
/// the process is first seen as `sh`, not Python; after the exec its Python frames are walked
/// and named, and the runtime is reported.
#[test]
fn a_shell_that_execs_python_is_profiled_as_python() {
    if !harness::kernel_or_skip("a_shell_that_execs_python_is_profiled_as_python") {
        return;
    }
    let interp = harness::interpreters()
        .into_iter()
        .rfind(|i| i.pre_args.is_empty() && i.path.to_string_lossy().contains("/.pyenv/"))
        .or_else(|| harness::interpreters().into_iter().next())
        .expect("an interpreter");
    let script = format!(
        "sleep 0.5; exec {} {} 6",
        interp.path.display(),
        harness::script("split.py").display()
    );
    let opts = RecordOptions {
        command: vec!["/bin/sh".into(), "-c".into(), script],
        duration: Duration::from_secs(8),
        sample_hz: 199,
        follow_children: true,
        python: true,
        progress: false,
        ..RecordOptions::default()
    };
    let p = record(&opts, &AtomicBool::new(false))
        .expect("record")
        .profiles
        .remove(0);
    let a = attribute(&p, None);
    let (line, errs) = judge(&format!("sh -c 'exec {}'", interp.name), &a, 8.0);
    eprintln!("{line}");
    assert!(
        a.runtime.iter().any(|r| r.starts_with("cpython 3.")),
        "runtime not reported: {:?}",
        a.runtime
    );
    assert!(errs.is_empty(), "{errs:?}");
}

/// Worst per-function error (points) of one profile of `periodic.py` against the truth the
/// program measured, the error of the total CPU time (%), and a one-line report.
fn periodic_errors(p: &AggregatedProfile, truth_file: &std::path::Path) -> (f64, f64, String) {
    let text = std::fs::read_to_string(truth_file).expect("periodic.py wrote its truth");
    let truth: HashMap<&str, f64> = text
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse::<f64>().expect("a number")))
        .collect();
    let funcs = ["alpha", "beta", "gamma"];
    let truth_total: f64 = funcs.iter().map(|f| truth[f]).sum();
    let mut measured: HashMap<&str, f64> = HashMap::new();
    for key in p.samples.keys() {
        let leaf = key.stack.iter().find(|f| f.kind == FrameKind::Python);
        if let Some(f) = leaf.and_then(|f| {
            funcs
                .iter()
                .find(|n| *f.function == *format!("periodic.{n}"))
        }) {
            *measured.entry(f).or_default() += p.value_of(key) as f64;
        }
    }
    let total: f64 = measured.values().sum();
    let mut worst: f64 = 0.0;
    let mut line = String::new();
    for f in funcs {
        let share = 100.0 * measured.get(f).copied().unwrap_or(0.0) / total.max(1.0);
        let want = 100.0 * truth[f] / truth_total;
        worst = worst.max((share - want).abs());
        line.push_str(&format!(" {f}={share:.1}%(truth {want:.1})"));
    }
    let cpu_err = 100.0 * (total - truth_total) / truth_total;
    line.push_str(&format!(
        " all={:.2}s/{} samples",
        p.total_value() as f64 / 1e9,
        p.total()
    ));
    line.push_str(&format!(
        " cpu={:.2}s(truth {:.2}s, {cpu_err:+.1}%)",
        total / 1e9,
        truth_total / 1e9
    ));
    (worst, cpu_err, line)
}

/// A loop whose iteration takes exactly the sampling period (99 Hz) is seen at the same phase by
/// a fixed-period clock; the jittered clock keeps every function within ±3 points of the truth
/// the program measured, in each of five runs, on CPython 3.12 and 3.13, the CPU time exact and
/// the long-run tick rate the one asked for.
#[test]
fn periodic_code_is_not_phase_locked() {
    if !harness::kernel_or_skip("periodic_code_is_not_phase_locked") {
        return;
    }
    const HZ: u32 = 99;
    let period = kprof_agent::kernel::clock::Jitter::new(u64::from(HZ))
        .period_ns
        .to_string();
    let mut interps: Vec<harness::Interp> = Vec::new();
    for minor in [12, 13] {
        match harness::interpreters()
            .into_iter()
            .find(|i| harness::minor_of(i) == Some(minor) && i.pre_args.is_empty())
        {
            Some(i) => interps.push(i),
            None if std::env::var("KPROF_REQUIRE_KERNEL").as_deref() == Ok("1") => {
                panic!("no CPython 3.{minor} here")
            }
            None => eprintln!("*** SKIP CPython 3.{minor}: not installed ***"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let truth = dir.path().join("truth");
    let truth_arg = truth.to_string_lossy().to_string();
    let mut failures = Vec::new();
    for interp in &interps {
        // 30 s is ~3,000 samples: a share's sampling error (σ ≈ 0.9 points at 50 %) then
        // stays well inside the ±3 points in every run. 6 s show a fixed period's lock.
        let run = |jitter: bool| {
            let secs = if jitter { 30 } else { 6 };
            let rec = record_cmd_clock(
                interp,
                "periodic.py",
                &[&period, &secs.to_string(), &truth_arg],
                secs + 5,
                HZ,
                jitter,
            );
            let (worst, cpu_err, mut line) = periodic_errors(rec.profile(), &truth);
            // Samples per second of the CPU time they stand for: the clock's real tick rate
            // (each sample's value is its CPU's measured tick interval).
            let rate = rec.profile().total() as f64 / (rec.profile().total_value() as f64 / 1e9);
            line.push_str(&format!(" rate={rate:.1}Hz"));
            let py = |s: PyStat| rec.stats.python[s as usize];
            line.push_str(&format!(
                " dropped={} unwalked={}",
                rec.stats.dropped,
                py(PyStat::NoThreadState) + py(PyStat::TsdReadErr) + py(PyStat::NoFrame)
            ));
            (worst, cpu_err, rate, line)
        };
        // The workload must defeat a fixed period, or this test proves nothing.
        let (fixed_worst, _, _, line) = run(false);
        eprintln!(
            "{:<14} fixed   worst={fixed_worst:>5.1}pp{line}",
            interp.name
        );
        if fixed_worst < 6.0 {
            failures.push(format!(
                "{}: a fixed period was only {fixed_worst:.1} points off: the workload does \
                 not lock onto it",
                interp.name
            ));
        }
        for i in 1..=5 {
            let (worst, cpu_err, rate, line) = run(true);
            eprintln!("{:<14} jitter{i} worst={worst:>5.1}pp{line}", interp.name);
            if worst > 3.0 {
                failures.push(format!(
                    "{} run {i}: a function {worst:.1} points off",
                    interp.name
                ));
            }
            if cpu_err.abs() > 5.0 {
                failures.push(format!(
                    "{} run {i}: CPU time {cpu_err:+.1}% off",
                    interp.name
                ));
            }
            if (rate / f64::from(HZ) - 1.0).abs() > 0.05 {
                failures.push(format!(
                    "{} run {i}: the clock ticked at {rate:.1} Hz, not {HZ}",
                    interp.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Seconds of one thread in a wall or lock profile, split as the wall workload times itself:
/// on CPU (running or waiting for a CPU), sleep, I/O, lock, and anything else.
fn wall_split(p: &AggregatedProfile, tid: u32) -> BTreeMap<&'static str, f64> {
    let mut out: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (k, v) in &p.values {
        if k.tid != tid {
            continue;
        }
        let Some(w) = k.wait else { continue };
        let part = match (w.state, w.class) {
            (ThreadState::Running | ThreadState::Runnable, _) => "cpu",
            (_, Some(WaitClass::Sleep)) => "sleep",
            (_, Some(WaitClass::Io)) => "read",
            (_, Some(WaitClass::Lock)) => "queue",
            _ => "other",
        };
        *out.entry(part).or_default() += *v as f64 / 1e9;
    }
    out
}

/// Records `script` at `hz` with `args` and, as its last argument, a file it writes the truth
/// it measured into; the recording and that truth, or why there is none.
fn record_truth(
    interp: &harness::Interp,
    script: &str,
    args: &[&str],
    secs: u64,
    hz: u32,
    types: Vec<ProfileType>,
) -> Result<(kprof_agent::record::Recording, serde_json::Value), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let truth_path = dir.path().join("truth.json");
    let truth_arg = truth_path.to_string_lossy().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.push(&truth_arg);
    let rec = record_cmd_with(interp, script, &all, secs, hz, true, types);
    let text = std::fs::read_to_string(&truth_path)
        .map_err(|e| format!("{}: no truth file from {script}: {e}", interp.name))?;
    let truth = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", interp.name))?;
    Ok((rec, truth))
}

#[test]
fn wall_splits_a_threads_time_by_how_it_waits_on_every_version() {
    if !harness::kernel_or_skip("wall_splits_a_threads_time_by_how_it_waits_on_every_version") {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let mut failures = Vec::new();
    for interp in interps {
        let (rec, truth) = match record_truth(
            &interp,
            "wall.py",
            &["8"],
            14,
            99,
            vec![ProfileType::Cpu, ProfileType::Wall, ProfileType::Lock],
        ) {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let tid = truth["tid"].as_u64().unwrap() as u32;
        let phases: BTreeMap<String, f64> =
            serde_json::from_value(truth["phases"].clone()).unwrap();
        let truth_total: f64 = phases.values().sum();
        let wall = rec.of_type(ProfileType::Wall).expect("a wall profile");
        let got = wall_split(wall, tid);
        let total: f64 = got.values().sum();
        let mut line = format!(
            "{:<14} thread {tid}: wall {total:.2}s (its loop {truth_total:.2}s)",
            interp.name
        );
        let mut errs = Vec::new();
        for (phase, secs) in &phases {
            let want = 100.0 * secs / truth_total;
            let have = 100.0 * got.get(phase.as_str()).copied().unwrap_or(0.0) / total.max(1e-9);
            line.push_str(&format!(" {phase}={have:.1}%/{want:.1}%"));
            if (have - want).abs() > 5.0 {
                errs.push(format!(
                    "{phase} {have:.1}% of the thread's wall time, truth {want:.1}%"
                ));
            }
        }
        // The thread's wall time is its life: the loop plus start and exit.
        if total < truth_total * 0.98 || total > truth_total + 1.0 {
            errs.push(format!(
                "wall total {total:.2}s for a {truth_total:.2}s loop"
            ));
        }
        // The lock profile holds the queue waits (and only lock waits).
        let lock = rec.of_type(ProfileType::Lock).expect("a lock profile");
        let lock_secs = wall_split(lock, tid).get("queue").copied().unwrap_or(0.0);
        let queue = phases["queue"];
        line.push_str(&format!(" lock={lock_secs:.2}s/{queue:.2}s"));
        if (lock_secs / queue - 1.0).abs() > 0.10 {
            errs.push(format!(
                "lock profile {lock_secs:.2}s of queue waits, truth {queue:.2}s"
            ));
        }
        line.push_str(&format!(
            " switch-outs={} captured={}",
            rec.stats.switch_outs, rec.stats.switch_outs_captured
        ));
        eprintln!("{}{line}", if errs.is_empty() { "PASS " } else { "FAIL " });
        if !errs.is_empty() {
            eprintln!("      {errs:?} {got:?}");
            failures.push(format!("{}: {errs:?}", interp.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A thread's seconds by wait state and class, to say where the time went when a check fails.
fn wait_breakdown(p: &AggregatedProfile, tid: u32) -> BTreeMap<String, f64> {
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in &p.values {
        if k.tid == tid {
            let w = k.wait.map(|w| format!("{:?}/{:?}", w.state, w.class));
            *by.entry(w.unwrap_or_else(|| "-".into())).or_default() += *v as f64 / 1e9;
        }
    }
    by
}

#[test]
fn gil_waits_and_holds_match_what_cpu_bound_threads_measure_on_every_version() {
    if !harness::kernel_or_skip(
        "gil_waits_and_holds_match_what_cpu_bound_threads_measure_on_every_version",
    ) {
        return;
    }
    const THREADS: usize = 3;
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let mut failures = Vec::new();
    for interp in interps {
        let (rec, truth) = match record_truth(
            &interp,
            "gil.py",
            &["8", &THREADS.to_string()],
            14,
            // The GIL changes hands every 5 ms: at 99 Hz a process figure drawn from ~800
            // samples is ±3 % (1σ); at 499 Hz ±1.5 %.
            499,
            vec![ProfileType::Wall],
        ) {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let wall = rec.profile();
        let mut line = format!("{:<20}", interp.name);
        let mut errs = Vec::new();
        let (mut held_all, mut cpu_all) = (0.0, 0.0);
        for t in truth["threads"].as_array().unwrap() {
            let tid = t["tid"].as_u64().unwrap() as u32;
            let (cpu, secs) = (t["cpu"].as_f64().unwrap(), t["wall"].as_f64().unwrap());
            let (mut total, mut gil_wait, mut held, mut preempted, mut asleep) = (0u64, 0, 0, 0, 0);
            for (k, v) in &wall.values {
                if k.tid != tid {
                    continue;
                }
                total += v;
                match k.wait.map(|w| (w.state, w.class)) {
                    Some((ThreadState::Runnable, _)) => preempted += v,
                    Some((ThreadState::Sleeping, class)) => {
                        asleep += v;
                        if class == Some(WaitClass::Gil) {
                            gil_wait += v;
                        }
                    }
                    _ => {}
                }
                if k.gil_held == Some(true) {
                    held += v;
                }
            }
            let pct = |ns: u64| 100.0 * ns as f64 / total.max(1) as f64;
            let (wait_pct, held_pct, preempted_pct) = (pct(gil_wait), pct(held), pct(preempted));
            // The thread measures the time it did not run (wall − CPU). That is its GIL wait
            // plus the time it was preempted while runnable, which the kernel reports as such
            // (another process, or the profiler, took the CPU): the GIL wait is checked against
            // the rest. Every sleep of these threads is on the GIL.
            let want_wait = 100.0 * (secs - cpu) / secs - preempted_pct;
            let want_held = 100.0 * cpu / secs;
            held_all += held as f64 / 1e9;
            cpu_all += cpu;
            line.push_str(&format!(
                " [{tid}: gil-wait {wait_pct:.1}%/{want_wait:.1}% held {held_pct:.1}%/{want_held:.1}% preempted {preempted_pct:.1}%]"
            ));
            if (wait_pct - want_wait).abs() > 5.0 {
                errs.push(format!(
                    "thread {tid} GIL wait {wait_pct:.1}%, truth {want_wait:.1}%; by wait: {:?}",
                    wait_breakdown(wall, tid)
                ));
            }
            if (gil_wait as f64) < 0.95 * asleep as f64 {
                errs.push(format!(
                    "thread {tid}: only {:.1}% of its sleep is GIL wait; by wait: {:?}",
                    100.0 * gil_wait as f64 / asleep.max(1) as f64,
                    wait_breakdown(wall, tid)
                ));
            }
            if (held_pct - want_held).abs() > 5.0 {
                errs.push(format!(
                    "thread {tid} GIL held {held_pct:.1}%, truth {want_held:.1}%"
                ));
            }
        }
        // The process: the GIL is held about as long as the threads ran Python.
        let window = truth["window"].as_f64().unwrap();
        let (have, want) = (100.0 * held_all / window, 100.0 * cpu_all / window);
        line.push_str(&format!(" process held {have:.1}%/{want:.1}%"));
        if (have - want).abs() > 5.0 {
            errs.push(format!("process GIL held {have:.1}%, truth {want:.1}%"));
        }
        eprintln!("{}{line}", if errs.is_empty() { "PASS " } else { "FAIL " });
        if !errs.is_empty() {
            failures.push(format!("{}: {errs:?}", interp.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn lock_waits_per_site_match_what_the_waiters_measure_on_every_version() {
    if !harness::kernel_or_skip(
        "lock_waits_per_site_match_what_the_waiters_measure_on_every_version",
    ) {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let mut failures = Vec::new();
    for interp in interps {
        let (rec, truth) = match record_truth(
            &interp,
            "lock.py",
            &["5"],
            12,
            99,
            vec![ProfileType::Lock, ProfileType::Wall],
        ) {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let lock = rec.of_type(ProfileType::Lock).expect("a lock profile");
        let wall = rec.of_type(ProfileType::Wall).expect("a wall profile");
        let mut line = format!("{:<20}", interp.name);
        let mut errs = Vec::new();
        let mut site_locks: Vec<Option<u64>> = Vec::new();
        for (site, want) in truth["sites"].as_object().unwrap() {
            let want = want.as_f64().unwrap();
            let waiters: Vec<u32> = truth["waiters"][site]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            let at_site = |k: &kprof_agent::profile::SampleKey| {
                let innermost = k.stack.iter().find(|f| f.kind == FrameKind::Python);
                waiters.contains(&k.tid)
                    && innermost.is_some_and(|f| f.function.ends_with(&format!(".{site}")))
            };
            // The waiters time their whole `acquire`: the lock wait, and then taking the GIL
            // back, and any time preempted or running. The wall profile tells those apart;
            // the lock profile is checked against the rest.
            let besides: u64 = wall
                .values
                .iter()
                .filter(|(k, _)| at_site(k))
                .filter(|(k, _)| k.wait.is_none_or(|w| w.class != Some(WaitClass::Lock)))
                .map(|(_, v)| *v)
                .sum();
            let besides = besides as f64 / 1e9;
            let want = want - besides;
            // The site: the innermost Python frame of the waiters' lock waits.
            let mut have = 0u64;
            let mut by_lock: BTreeMap<u64, u64> = BTreeMap::new();
            for (k, v) in &lock.values {
                if at_site(k) {
                    have += v;
                    if let Some(addr) = k.wait.and_then(|w| w.lock) {
                        *by_lock.entry(addr).or_default() += v;
                    }
                }
            }
            let have = have as f64 / 1e9;
            line.push_str(&format!(" {site}={have:.2}s/{want:.2}s (+{besides:.2}s)"));
            if (have / want - 1.0).abs() > 0.10 {
                // Where the waiters' time went: by innermost Python function.
                let mut by: BTreeMap<String, f64> = BTreeMap::new();
                for (k, v) in &wall.values {
                    if waiters.contains(&k.tid) {
                        let f = k.stack.iter().find(|f| f.kind == FrameKind::Python);
                        let name = f.map_or("(no Python frame)".into(), |f| f.function.to_string());
                        let w = k.wait.map(|w| format!("{:?}/{:?}", w.state, w.class));
                        *by.entry(format!("{name} {}", w.unwrap_or_default()))
                            .or_default() += *v as f64 / 1e9;
                    }
                }
                errs.push(format!("{site}: {have:.2}s waited, truth {want:.2}s; waiters' lock time by innermost frame: {by:?}"));
            }
            // Up to 3.12 a threading.Lock waits on its own semaphore: one address per lock.
            let (top_addr, top_ns) = by_lock
                .iter()
                .max_by_key(|(_, ns)| **ns)
                .map(|(a, n)| (*a, *n))
                .unwrap_or_default();
            let share = top_ns as f64 / 1e9 / have.max(1e-9);
            site_locks.push((share > 0.9).then_some(top_addr));
        }
        if harness::minor_of(&interp).is_some_and(|m| m <= 12) {
            line.push_str(&format!(" locks={site_locks:x?}"));
            if site_locks.iter().any(Option::is_none) || site_locks.first() == site_locks.last() {
                errs.push(format!(
                    "one stable address per lock expected: {site_locks:x?}"
                ));
            }
        }
        eprintln!("{}{line}", if errs.is_empty() { "PASS " } else { "FAIL " });
        if !errs.is_empty() {
            failures.push(format!("{}: {errs:?}", interp.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn off_cpu_threads_exiting_mid_wait_and_exec_degrade_gracefully() {
    if !harness::kernel_or_skip("off_cpu_threads_exiting_mid_wait_and_exec_degrade_gracefully") {
        return;
    }
    let interp = harness::interpreters()
        .into_iter()
        .find(|i| harness::minor_of(i) == Some(12) && i.pre_args.is_empty())
        .or_else(|| harness::interpreters().into_iter().next())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("exits.json");
    let rec = record_cmd_with(
        &interp,
        "exits.py",
        &[&truth_path.to_string_lossy()],
        10,
        99,
        true,
        vec![ProfileType::Cpu, ProfileType::Wall],
    );
    let truth: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&truth_path).unwrap()).unwrap();
    let wall = rec.of_type(ProfileType::Wall).unwrap();
    let window = wall.duration.as_secs_f64();
    let per_thread = |tid: u32| -> f64 {
        wall.values
            .iter()
            .filter(|(k, _)| k.tid == tid)
            .map(|(_, v)| *v as f64 / 1e9)
            .sum()
    };
    // Waiters killed by the exec: their time ends there (~1.5 s of waiting), not at the end of
    // the recording.
    for tid in truth["killed"].as_array().unwrap() {
        let secs = per_thread(tid.as_u64().unwrap() as u32);
        eprintln!("killed waiter {tid}: {secs:.2}s of wall time (window {window:.2}s)");
        assert!(
            (1.2..=2.2).contains(&secs),
            "a waiter killed by exec after ~1.5 s has {secs:.2}s"
        );
    }
    // The thread that exited after its wait: half a second of lock wait, then nothing.
    let short = truth["short"].as_u64().unwrap() as u32;
    let short_secs = per_thread(short);
    eprintln!("short-lived thread: {short_secs:.2}s");
    assert!((0.4..=1.0).contains(&short_secs), "{short_secs:.2}s");
    // Every thread's wall time fits in the window, and the new image's CPU is profiled.
    let tids: std::collections::BTreeSet<u32> = wall.values.keys().map(|k| k.tid).collect();
    for tid in tids {
        assert!(
            per_thread(tid) <= window + 0.5,
            "thread {tid}: {:.2}s",
            per_thread(tid)
        );
    }
    let cpu = rec.of_type(ProfileType::Cpu).unwrap();
    let after_exec: u64 = cpu
        .values
        .iter()
        .filter(|(k, _)| {
            k.stack
                .iter()
                .any(|f| f.file.as_deref() == Some("<string>"))
        })
        .map(|(_, v)| v)
        .sum();
    assert!(
        after_exec as f64 / 1e9 > 0.8,
        "the exec'd program's CPU is profiled: {:.2}s",
        after_exec as f64 / 1e9
    );
}

#[test]
fn threads_are_counted_named_and_a_leak_is_found_on_every_version() {
    if !harness::kernel_or_skip("threads_are_counted_named_and_a_leak_is_found_on_every_version") {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let mut failures = Vec::new();
    for interp in interps {
        let (rec, truth) =
            match record_truth(&interp, "leak.py", &[], 10, 99, vec![ProfileType::Threads]) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
        let pid = truth["pid"].as_u64().unwrap() as u32;
        let p = rec
            .of_type(ProfileType::Threads)
            .expect("a threads profile");
        let Some(report) = p.threads.as_ref() else {
            failures.push(format!("{}: no thread report", interp.name));
            continue;
        };
        let mut errs = Vec::new();
        let Some(counts) = report.processes.get(&pid) else {
            failures.push(format!("{}: pid {pid} not in the report", interp.name));
            continue;
        };
        // Truth: (monotonic seconds, alive, created, exited) every 0.2 s.
        let samples: Vec<(f64, i64, i64, i64)> = truth["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["t"].as_f64().unwrap(),
                    s["count"].as_i64().unwrap(),
                    s["created"].as_i64().unwrap(),
                    s["exited"].as_i64().unwrap(),
                )
            })
            .collect();
        let nearest = |t: f64| {
            samples
                .iter()
                .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
                .copied()
        };
        // The counts over time, against what the process counted in /proc just before and just
        // after (0.2 s apart): within their range, ±1 for a short-lived thread that either count
        // caught or missed (the flasher's threads each live a few ms, longer while the pool
        // holds the GIL) — a leak and a flash thread can move the count by 2 within 0.1 s.
        let mut compared = 0;
        // The first point is the window's first look at the process, amid the script's first
        // thread starts: the per-second counts after it are what is compared.
        for &(t_ns, n) in counts.series.iter().skip(1) {
            let t = t_ns as f64 / 1e9;
            let before = samples.iter().rev().find(|s| s.0 <= t);
            let after = samples.iter().find(|s| s.0 >= t);
            let (Some(a), Some(b)) = (before, after) else {
                continue; // before the script ran, or after it was stopped
            };
            if b.0 - a.0 > 0.5 {
                continue;
            }
            compared += 1;
            let (lo, hi) = (a.1.min(b.1) - 1, a.1.max(b.1) + 1);
            if !(lo..=hi).contains(&i64::from(n)) {
                errs.push(format!(
                    "{n} threads at {t:.2}s, the process counted {} at {:.2}s and {} at {:.2}s",
                    a.1, a.0, b.1, b.0
                ));
            }
        }
        if compared < 5 {
            errs.push(format!("only {compared} counts to compare with the truth"));
        }
        // Created and exited by the window's end: the flasher starts ~25 threads a second. The
        // profile counts until sampling stops, after its last per-second point and up to about
        // when the script was stopped: at least what the script had counted near that point,
        // at most what it had counted in its last word (written every 0.2 s) and 0.25 s more.
        let end_t = counts.series.last().map_or(0.0, |s| s.0 as f64 / 1e9);
        if let (Some(s), Some(last)) = (nearest(end_t), samples.last().copied()) {
            let below = 3 + (40.0 * (s.0 - end_t).abs()) as i64;
            let above = 3 + (40.0 * 0.25) as i64;
            for (what, have, near, fin) in [
                ("created", counts.created, s.2, last.2),
                ("exited", counts.exited, s.3, last.3),
            ] {
                // Python's own threads all come from the script: created counts every creation.
                let (lo, hi) = (near - below, fin + above);
                if !(lo..=hi).contains(&i64::from(have)) {
                    errs.push(format!("{what} {have} (truth {lo}..={hi})"));
                }
            }
        }
        // The Python names of the threads alive at the end, read from the interpreter.
        let names: BTreeMap<String, String> =
            serde_json::from_value(truth["names"].clone()).unwrap();
        let mut named = 0;
        for (tid, want) in &names {
            let tid_n: u32 = tid.parse().unwrap();
            let Some(row) = report.threads.iter().find(|r| r.tid == tid_n && r.alive) else {
                continue;
            };
            named += 1;
            if &*row.name != want.as_str() {
                errs.push(format!(
                    "thread {tid} named {:?}, Python says {want:?}",
                    row.name
                ));
            }
        }
        if named < names.len().saturating_sub(2) {
            errs.push(format!("{named} of {} named threads found", names.len()));
        }
        // The leak, with the leaking function as the creator.
        match report.leaks.iter().find(|l| l.pid == pid) {
            None => errs.push("the leak was not flagged".into()),
            Some(l) => {
                let creator = l.creator.as_deref().and_then(|s| s.first());
                if creator.is_none_or(|f| !f.function.ends_with("leak_one")) {
                    errs.push(format!("leak creator {creator:?}"));
                }
                if l.by_creator < 3 {
                    errs.push(format!(
                        "only {} leaked threads by the creator",
                        l.by_creator
                    ));
                }
            }
        }
        if !p.warnings.iter().any(|w| w.contains("thread leak")) {
            errs.push("no leak warning on the profile".into());
        }
        // The leaked threads that lived through half the recording are idle, blocked waiting.
        let leaked: Vec<u32> = serde_json::from_value(truth["leaked"].clone()).unwrap();
        let idle: Vec<&kprof_agent::profile::threads::IdleThread> = report
            .idle
            .iter()
            .filter(|t| leaked.contains(&t.tid))
            .collect();
        if idle.len() < 4 {
            errs.push(format!("{} leaked threads listed as idle", idle.len()));
        }
        if let Some(t) = idle.iter().find(|t| {
            !t.blocked_in
                .iter()
                .any(|f| f.function.ends_with("blocked_forever"))
        }) {
            errs.push(format!(
                "idle thread {} blocked in {:?}",
                t.tid, t.blocked_in
            ));
        }
        // The pool workers ran: not idle.
        if report.idle.iter().any(|t| {
            names
                .get(&t.tid.to_string())
                .is_some_and(|n| n.contains("pool"))
        }) {
            errs.push("a busy pool worker listed as idle".into());
        }
        let line = format!(
            "{:<14} start {} end {} min {} max {} created {} exited {} idle {} leaks {}",
            interp.name,
            counts.start,
            counts.end,
            counts.min,
            counts.max,
            counts.created,
            counts.exited,
            report.idle.len(),
            report.leaks.len()
        );
        eprintln!("{}{line}", if errs.is_empty() { "PASS " } else { "FAIL " });
        if !errs.is_empty() {
            eprintln!("      {errs:?}");
            failures.push(format!("{}: {errs:?}", interp.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
