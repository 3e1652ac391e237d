//! User-space reference walker against every installed CPython (3.8–3.13 from pyenv, which use
//! `libpython3.X.so`, a static 3.14 from `e2e/testbed/build-cpython.sh`, and the distribution's
//! statically linked `/usr/bin/python3.X`): offsets,
//! the TSS thread-state lookup the eBPF program does, line tables and names — no eBPF needed.
//!
//! `cargo test -p kprof-agent --test python_walker -- --nocapture` (root is not needed when the
//! workload is a child of the test; ptrace_scope 1 allows reading children).

#[path = "workloads/python/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use kprof_agent::python::procmem::RemoteMemory as _;
use kprof_agent::python::{PyProcess, PythonSupport};
use kprof_common::python::PYFRAME_RUN_END;

/// Everything the test expects to see, checked per interpreter.
#[derive(Default, Debug)]
struct Seen {
    busy_chain: bool,
    zlib: bool,
    main_join: bool,
    deep: usize,
    tss_ok: usize,
    tss_total: usize,
    names_ok: bool,
    run_ends_ok: bool,
}

fn check(interp: &harness::Interp) -> Result<String, String> {
    let w = harness::spawn(interp, "threads.py", &["60"], Duration::from_secs(20))?;
    let m = harness::markers("threads.py");
    let mut support = PythonSupport::without_kernel(0);
    let info = support
        .attach(w.pid, Duration::from_secs(5))
        .ok_or_else(|| format!("{}: not detected as Python", interp.name))?;
    if !info.python_frames {
        return Err(format!(
            "{}: {} {:?}",
            interp.name, info.display, info.warnings
        ));
    }
    let proc_: PyProcess = support.process(w.pid).unwrap().clone();
    let qual = proc_.version.at_least(3, 11);
    let meth = if qual {
        "threads.K.meth"
    } else {
        "threads.meth"
    };
    let mut seen = Seen::default();
    let start = Instant::now();
    let mut last_dump = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        let threads = proc_.walk_all_threads(256).map_err(|e| e.to_string())?;
        let mut dump = String::new();
        for t in &threads {
            seen.tss_total += 1;
            if proc_.tss_thread_state(t.thread_id) == Some(t.tstate) {
                seen.tss_ok += 1;
            }
            let frames: Vec<_> = t
                .frames
                .iter()
                .map(|f| support.symbolize(w.pid, f))
                .collect();
            let sig: Vec<(String, u32)> = frames
                .iter()
                .map(|f| (f.function.to_string(), f.line))
                .collect();
            dump.push_str(&format!(
                "  thread {:#x} tid {:?}: {}\n",
                t.thread_id,
                t.native_tid,
                frames
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(" <- ")
            ));
            let has = |i: usize, name: &str, line: &str| {
                sig.get(i)
                    .map(|(n, l)| n == name && *l == m[line])
                    .unwrap_or(false)
            };
            if has(0, "threads.leaf", "leaf")
                && has(1, meth, "meth")
                && has(2, "threads.busy", "busy")
            {
                seen.busy_chain = true;
                if let Some(tid) = t.native_tid {
                    seen.names_ok = harness::thread_comm(w.pid, tid) == "py-busy";
                } else {
                    seen.names_ok = true; // no native thread id before 3.11
                }
            }
            if has(0, "threads.compress_loop", "compress") {
                seen.zlib = true;
            }
            if sig
                .iter()
                .any(|(n, l)| n == "threads.<module>" && *l == m["join"])
            {
                seen.main_join = true;
            }
            let deep = sig
                .iter()
                .filter(|(n, l)| n == "threads.recurse" && *l == m["recurse"])
                .count();
            if has(0, "threads.recurse", "sleep") {
                seen.deep = seen.deep.max(deep);
            }
            // Run ends: ≤3.10 every frame; 3.11+ the thread bootstrap and <module> runs.
            if !t.frames.is_empty() && t.frames.last().unwrap().flags & PYFRAME_RUN_END != 0 {
                seen.run_ends_ok = true;
            }
        }
        last_dump = dump;
        if seen.busy_chain && seen.zlib && seen.main_join && seen.deep >= 60 && seen.names_ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The GIL is found by its contents, and its last holder is one of the thread states.
    let gil = proc_.find_gil();
    let gil_ok = gil.is_some_and(|g| {
        let holder = proc_.mem.read_u64(g + 8).unwrap_or(u64::MAX);
        let states = proc_.thread_states().unwrap_or_default();
        holder == 0 || states.contains(&holder)
    });
    let ok = gil_ok
        && seen.busy_chain
        && seen.zlib
        && seen.main_join
        && seen.deep >= 60
        && seen.tss_ok == seen.tss_total
        && seen.names_ok
        && seen.run_ends_ok;
    let summary = format!(
        "{:<18} {:<40} gil={:?} busy={} zlib={} main={} deep={} tss={}/{} names={} notes={:?}",
        interp.name,
        info.display,
        gil.map(|g| format!("{g:#x}")),
        seen.busy_chain,
        seen.zlib,
        seen.main_join,
        seen.deep,
        seen.tss_ok,
        seen.tss_total,
        seen.names_ok,
        proc_.notes
    );
    if ok {
        Ok(summary)
    } else {
        Err(format!("{summary}\nlast stacks:\n{last_dump}"))
    }
}

#[test]
fn reference_walker_all_versions() {
    let interps = harness::interpreters();
    if interps.is_empty() {
        eprintln!("SKIP reference_walker_all_versions: no CPython 3.8+ found (pyenv or /usr/bin)");
        return;
    }
    let mut failures = Vec::new();
    for i in &interps {
        match check(i) {
            Ok(s) => eprintln!("PASS {s}"),
            Err(e) => {
                eprintln!("FAIL {e}");
                failures.push(i.name.clone());
            }
        }
    }
    assert!(failures.is_empty(), "failed: {failures:?}");
}

#[test]
fn non_python_process_is_not_detected() {
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut s = PythonSupport::without_kernel(0);
    assert!(s.attach(child.id(), Duration::ZERO).is_none());
    let _ = child.kill();
    let _ = child.wait();
}

/// Interpreters outside the supported range are reported with a warning (native frames only),
/// never dropped silently and never a crash.
#[test]
fn unsupported_versions_warn() {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut tried = 0;
    for v in ["3.7", "3.6", "2.7"] {
        let Ok(rd) = std::fs::read_dir(format!("{home}/.pyenv/versions")) else {
            break;
        };
        let Some(dir) = rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{v}."))
        }) else {
            continue;
        };
        let exe = dir.join(format!("bin/python{v}"));
        if !exe.exists() {
            continue;
        }
        tried += 1;
        let mut child = std::process::Command::new(&exe)
            .args(["-c", "import time\nwhile True: time.sleep(0.1)"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut s = PythonSupport::without_kernel(0);
        let info = s.attach(child.id(), Duration::from_secs(2));
        let _ = child.kill();
        let _ = child.wait();
        let info = info.unwrap_or_else(|| panic!("python {v} not reported"));
        eprintln!("python {v}: {} {:?}", info.display, info.warnings);
        assert!(!info.python_frames, "{v}");
        assert!(
            info.warnings.iter().any(|w| w.contains("not supported")),
            "{v}: {:?}",
            info.warnings
        );
    }
    if tried == 0 {
        eprintln!("SKIP unsupported_versions_warn: no CPython 2.7/3.6/3.7 installed");
    }
}
