//! Shared helpers of the Python tests (included with `#[path]` by `agent/tests/python*.rs`):
//! the installed interpreters, spawning a workload and waiting until it is ready, and the
//! `# L:<name>` line markers of the workload scripts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One Python interpreter to test.
#[derive(Clone, Debug)]
pub struct Interp {
    /// e.g. `pyenv-3.12`, `debian-3.11`, `embed-3.11`.
    pub name: String,
    pub path: PathBuf,
    /// Extra arguments put before the script (none for a plain interpreter).
    pub pre_args: Vec<String>,
}

pub fn workloads_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/python");
    if here.exists() {
        here
    } else {
        PathBuf::from("/work/main/agent/tests/workloads/python")
    }
}

/// Allow running the tests from a scratch crate outside the repo.
pub fn script(name: &str) -> PathBuf {
    let here = workloads_dir().join(name);
    if here.exists() {
        return here;
    }
    PathBuf::from("/work/main/agent/tests/workloads/python").join(name)
}

/// Interpreters: `KPROF_PYTHONS` (comma-separated paths), or for each of 3.8–3.14 the newest
/// pyenv build (else one built by `e2e/testbed/build-cpython.sh`) plus the distribution's
/// `/usr/bin/python3.X`, and a C program embedding the distribution's libpython.
pub fn interpreters() -> Vec<Interp> {
    let plain = |name: String, path: PathBuf| Interp {
        name,
        path,
        pre_args: vec![],
    };
    if let Ok(list) = std::env::var("KPROF_PYTHONS") {
        return list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|p| plain(p.to_string(), PathBuf::from(p)))
            .collect();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cache = std::env::var("KPROF_CACHE").unwrap_or_else(|_| "/var/cache/kprof".into());
    let mut out = Vec::new();
    for minor in 8..=14 {
        if let Some((dir, exe)) = newest_build(&Path::new(&home).join(".pyenv/versions"), minor) {
            out.push(plain(format!("pyenv-{dir}"), exe));
        } else if let Some((dir, exe)) = newest_build(&Path::new(&cache).join("cpython"), minor) {
            out.push(plain(format!("built-{dir}"), exe));
        }
        let sys = PathBuf::from(format!("/usr/bin/python3.{minor}"));
        if sys.exists() {
            out.push(plain(format!("system-3.{minor}"), sys));
        }
    }
    out.extend(embedded());
    out
}

/// The newest `<root>/3.<minor>.<patch>/bin/python3.<minor>`: its directory name and path.
fn newest_build(root: &Path, minor: u32) -> Option<(String, PathBuf)> {
    let prefix = format!("3.{minor}.");
    let mut builds: Vec<(u32, String, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let dir = e.file_name().to_string_lossy().to_string();
            let patch = dir.strip_prefix(&prefix)?.parse().ok()?;
            let exe = e.path().join(format!("bin/python3.{minor}"));
            exe.exists().then_some((patch, dir, exe))
        })
        .collect();
    builds.sort();
    builds.pop().map(|(_, dir, exe)| (dir, exe))
}

/// Fails unless every minor version listed in `KPROF_REQUIRE_PYTHON_MINORS` (comma-separated,
/// e.g. `8,9,14`; set by `make test-kernel`) is among `interps`: a version that disappeared
/// from the machine must not pass as "tested".
pub fn assert_required_minors(interps: &[Interp]) {
    let Ok(list) = std::env::var("KPROF_REQUIRE_PYTHON_MINORS") else {
        return;
    };
    let have: Vec<u32> = interps.iter().filter_map(minor_of).collect();
    let missing: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty() && !m.parse().is_ok_and(|m: u32| have.contains(&m)))
        .collect();
    let versions = |minors: Vec<String>| {
        minors
            .iter()
            .map(|m| format!("3.{m}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert!(
        missing.is_empty(),
        "KPROF_REQUIRE_PYTHON_MINORS: no CPython {} here (found: {}); pyenv or \
         e2e/testbed/build-cpython.sh provide them",
        versions(missing.iter().map(|m| m.to_string()).collect()),
        versions(have.iter().map(|m| m.to_string()).collect()),
    );
}

/// The minor version of an interpreter, from its `python3.X` name (None for other names).
pub fn minor_of(interp: &Interp) -> Option<u32> {
    let name = interp.path.file_name()?.to_string_lossy().to_string();
    name.strip_prefix("python3.")?.parse().ok()
}

/// A C program embedding the distribution's shared `libpython3.X.so` (built on demand with
/// `cc`; absent when no headers / library / compiler).
pub fn embedded() -> Option<Interp> {
    for minor in (8..=14).rev() {
        let header = PathBuf::from(format!("/usr/include/python3.{minor}/Python.h"));
        let lib = PathBuf::from(format!("/usr/lib/x86_64-linux-gnu/libpython3.{minor}.so"));
        if !header.exists() || !lib.exists() {
            continue;
        }
        let out = std::env::temp_dir().join(format!("kprof-embed-python3.{minor}"));
        if !out.exists() {
            let ok = Command::new("cc")
                .arg("-O1")
                .arg("-o")
                .arg(&out)
                .arg(workloads_dir().join("embed.c"))
                .arg(format!("-I/usr/include/python3.{minor}"))
                .arg(format!("-lpython3.{minor}"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("note: could not build the libpython3.{minor} embedding program");
                return None;
            }
        }
        return Some(Interp {
            name: format!("embed-libpython3.{minor}"),
            path: out,
            pre_args: vec![],
        });
    }
    None
}

/// A running workload, killed on drop.
pub struct Workload {
    pub child: Child,
    pub pid: u32,
    /// Lines printed after READY are not read; stdout stays a pipe.
    _reader: Option<BufReader<std::process::ChildStdout>>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `interp script args…` and wait for its `READY` line (at most `timeout`).
pub fn spawn(
    interp: &Interp,
    script_name: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Workload, String> {
    let mut cmd = Command::new(&interp.path);
    cmd.args(&interp.pre_args)
        .arg(script(script_name))
        .args(args);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", interp.path.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) if line.starts_with("READY") => {
                    let _ = tx.send(Some(()));
                    // Keep draining so the child never blocks on a full pipe.
                    let mut sink = String::new();
                    while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                        sink.clear();
                    }
                    return;
                }
                Ok(_) => {}
            }
        }
    });
    let start = Instant::now();
    let w = Workload {
        child,
        pid,
        _reader: None,
    };
    match rx.recv_timeout(timeout.saturating_sub(start.elapsed())) {
        Ok(Some(())) => Ok(w),
        _ => Err(format!(
            "{}: workload {script_name} did not become ready",
            interp.name
        )),
    }
}

/// `# L:<name>` markers of a workload script → line numbers (1-based).
pub fn markers(script_name: &str) -> HashMap<String, u32> {
    let text = std::fs::read_to_string(script(script_name)).expect("workload script");
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(pos) = line.find("# L:") {
            let name: String = line[pos + 4..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name, i as u32 + 1);
        }
    }
    out
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Thread name (`comm`) of a thread.
pub fn thread_comm(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `Some(reason)` when the Python kernel tests cannot run here.
pub fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("not root (needs CAP_BPF + CAP_PERFMON)".into());
    }
    if !kprof_agent::kernel::loader::ebpf_available() {
        return Some("kprof-agent built without its eBPF object (AYA_BUILD_SKIP)".into());
    }
    if interpreters().is_empty() {
        return Some("no CPython 3.8+ installed".into());
    }
    None
}

/// Skip loudly, or fail under `KPROF_REQUIRE_KERNEL=1`.
pub fn kernel_or_skip(test: &str) -> bool {
    match skip_reason() {
        None => true,
        Some(why) => {
            if std::env::var("KPROF_REQUIRE_KERNEL").as_deref() == Ok("1") {
                panic!("{test}: kernel test required (KPROF_REQUIRE_KERNEL=1) but: {why}");
            }
            eprintln!("\n*** SKIP {test}: {why} ***\n");
            false
        }
    }
}
