//! Python thread names read from memory (`PyProcess::thread_names`) against what Python itself
//! reports, for every installed CPython (`harness::interpreters()`: 3.8–3.14 from pyenv or
//! `e2e/testbed/build-cpython.sh`, the distribution's `/usr/bin/python3.X`, and a C program
//! embedding its libpython).
//!
//! The workload (`workloads/python/named.py`) starts threads with ASCII, latin-1, UCS-2, UCS-4,
//! long, renamed and default names, and with attributes both in the per-type compact storage
//! and in a materialised `__dict__`; it writes each thread's `native_id`, `ident` and `name` as
//! Python sees them to a JSON file before it prints READY. A second run (`--churn`) keeps
//! starting threads and renaming one while names are read over and over: every read must end
//! (an error is allowed, a panic or a hang is not) and most must succeed.
//!
//! `cargo test -p kprof-agent --test python_threads -- --nocapture` (root is not needed when
//! the workload is a child of the test; ptrace_scope 1 allows reading children).

#[path = "workloads/python/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kprof_agent::python::PythonSupport;
use kprof_agent::python::threads::{PyThreadName, ThreadNamesError};

/// One thread as Python reported it.
#[derive(Debug, serde::Deserialize)]
struct TruthThread {
    native_id: u32,
    ident: u64,
    name: String,
}

#[derive(Debug, serde::Deserialize)]
struct Truth {
    threading_imported: bool,
    threads: Vec<TruthThread>,
}

fn read_truth(path: &Path) -> Result<Truth, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Start `named.py` and attach to it; the support is returned with the workload, which must
/// outlive the reads.
fn start(
    interp: &harness::Interp,
    truth: &Path,
    extra: &[&str],
) -> Result<(harness::Workload, PythonSupport, Truth), String> {
    let path = truth.to_str().ok_or("non-UTF-8 temporary path")?;
    let mut args = vec![path, "60"];
    args.extend_from_slice(extra);
    let w = harness::spawn(interp, "named.py", &args, Duration::from_secs(30))?;
    let truth = read_truth(truth)?;
    let mut support = PythonSupport::without_kernel(0);
    support
        .attach(w.pid, Duration::from_secs(5))
        .ok_or_else(|| "not detected as Python".to_string())?;
    if support.process(w.pid).is_none() {
        return Err(format!(
            "interpreter not set up: {:?}",
            support.runtime(w.pid)
        ));
    }
    Ok((w, support, truth))
}

/// Every (tid, ident, name) Python reported must be read back, and nothing else.
fn check_named(interp: &harness::Interp, dir: &Path) -> Result<String, String> {
    let (w, support, truth) = start(interp, &dir.join("named.json"), &[])?;
    let version = support
        .process(w.pid)
        .map(|p| p.version.to_string())
        .unwrap_or_default();
    let read = support
        .thread_names(w.pid)
        .map_err(|e| format!("thread_names: {e}"))?;
    let key = |tid: u32, ident: u64, name: &str| (tid, ident, name.to_string());
    let want: BTreeSet<_> = truth
        .threads
        .iter()
        .map(|t| key(t.native_id, t.ident, &t.name))
        .collect();
    let got: BTreeSet<_> = read
        .iter()
        .map(|t: &PyThreadName| key(t.tid, t.ident, &t.name))
        .collect();
    let mut problems = Vec::new();
    if read.len() != truth.threads.len() {
        problems.push(format!(
            "{} threads read, Python has {}",
            read.len(),
            truth.threads.len()
        ));
    }
    for missing in want.difference(&got) {
        problems.push(format!("missing {missing:?}"));
    }
    for extra in got.difference(&want) {
        problems.push(format!("unexpected {extra:?}"));
    }
    match read.iter().find(|t| t.name == "MainThread") {
        Some(main) if main.tid == w.pid => {}
        Some(main) => problems.push(format!("MainThread has tid {}, pid {}", main.tid, w.pid)),
        None => problems.push("no MainThread".into()),
    }
    if problems.is_empty() {
        Ok(format!("{version}: {} threads named", read.len()))
    } else {
        Err(format!("{version}: {}", problems.join("; ")))
    }
}

/// Without `threading` imported there is nothing to read, and that is told apart from an error.
fn check_bare(interp: &harness::Interp, dir: &Path) -> Result<String, String> {
    let (w, support, truth) = start(interp, &dir.join("bare.json"), &["--bare"])?;
    match (truth.threading_imported, support.thread_names(w.pid)) {
        (false, Err(ThreadNamesError::NoThreadingModule)) => Ok("no threading: told".into()),
        (false, other) => Err(format!(
            "threading not imported, thread_names gave {other:?}"
        )),
        // Start-up code (a site hook, a .pth file) imported it: only the main thread exists.
        (true, Ok(names)) if names.iter().any(|t| t.name == "MainThread") => {
            Ok("threading imported at start-up: MainThread read".into())
        }
        (true, other) => Err(format!(
            "threading imported at start-up, thread_names gave {other:?}"
        )),
    }
}

/// Reads while threads come and go: no panic, no hang, the main thread in every successful read.
fn check_churn(interp: &harness::Interp, dir: &Path) -> Result<String, String> {
    const READS: usize = 300;
    let (w, support, _) = start(interp, &dir.join("churn.json"), &["--churn"])?;
    let (mut ok, mut errors) = (0, Vec::new());
    for _ in 0..READS {
        match support.thread_names(w.pid) {
            Ok(names) => {
                if !names
                    .iter()
                    .any(|t| t.name == "MainThread" && t.tid == w.pid)
                {
                    return Err(format!("churn: no MainThread in {names:?}"));
                }
                ok += 1;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    // Torn reads are expected now and then, not as the rule.
    if ok < READS / 2 {
        return Err(format!(
            "churn: {ok} of {READS} reads succeeded; first errors {:?}",
            &errors[..errors.len().min(3)]
        ));
    }
    let torn = errors
        .first()
        .map(|e| format!(", torn e.g. \"{e}\""))
        .unwrap_or_default();
    Ok(format!("churn: {ok}/{READS} reads{torn}"))
}

type Check = fn(&harness::Interp, &Path) -> Result<String, String>;

#[test]
fn thread_names_match_python_on_every_interpreter() {
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    assert!(!interps.is_empty(), "no CPython installed");
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut failed = Vec::new();
    for interp in &interps {
        let sub = dir.path().join(&interp.name);
        std::fs::create_dir_all(&sub).expect("temporary directory");
        let checks: [Check; 3] = [check_named, check_bare, check_churn];
        let outcome = checks
            .iter()
            .map(|check| check(interp, &sub))
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("; "));
        match outcome {
            Ok(summary) => println!("ok    {:<24} {summary}", interp.name),
            Err(e) => {
                println!("FAIL  {:<24} {e}", interp.name);
                failed.push(interp.name.clone());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "thread names wrong on: {}",
        failed.join(", ")
    );
}
