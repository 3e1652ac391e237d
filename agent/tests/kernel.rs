//! Kernel tests of `kprof-agent record`: the real eBPF sampler on this machine's kernel against
//! workloads with known hot functions (C, Rust, a syscall loop), built from
//! `tests/workloads/` into a temporary directory.
//!
//! Need root (or CAP_BPF + CAP_PERFMON) and an agent built with its eBPF programs. Otherwise each
//! test prints `SKIPPED: <reason>` and passes — unless `KPROF_REQUIRE_KERNEL=1`, then it fails.
//!
//!     sudo -E cargo test -p kprof-agent --test kernel -- --test-threads=1
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    thread,
    time::{Duration, Instant},
};

use kprof_agent::pprof::{self, PprofProfile};

const AGENT: &str = env!("CARGO_BIN_EXE_kprof-agent");

/// CPU workloads compete for two cores: run one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn skip_reason() -> Option<String> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the eBPF sampler needs CAP_BPF + CAP_PERFMON)".into());
    }
    if !kprof_agent::kernel::loader::ebpf_available() {
        return Some("kprof-agent was built without eBPF programs (AYA_BUILD_SKIP)".into());
    }
    None
}

/// Returns false (after printing why) when the test must be skipped.
fn kernel_or_skip(test: &str) -> bool {
    match skip_reason() {
        None => true,
        Some(why) if std::env::var("KPROF_REQUIRE_KERNEL").is_ok_and(|v| v == "1") => {
            panic!("{test}: KPROF_REQUIRE_KERNEL=1 but cannot run: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED kernel test {test}: {why}");
            false
        }
    }
}

struct Workloads {
    _dir: tempfile::TempDir,
    hot_c: PathBuf,
    syscalls_c: PathBuf,
    hot_rs: PathBuf,
}

fn workloads() -> &'static Workloads {
    static W: OnceLock<Workloads> = OnceLock::new();
    W.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads");
        let dir = tempfile::tempdir().expect("tempdir");
        let cc = |name: &str, out: &str| {
            let out = dir.path().join(out);
            // -mno-omit-leaf-frame-pointer: GCC omits the frame pointer of leaf functions even
            // with -fno-omit-frame-pointer, which hides the leaf's caller from any FP unwinder.
            let st = Command::new("cc")
                .args([
                    "-O1",
                    "-fno-omit-frame-pointer",
                    "-mno-omit-leaf-frame-pointer",
                    "-g",
                    "-o",
                ])
                .arg(&out)
                .arg(src.join(name))
                .status()
                .expect("run cc");
            assert!(st.success(), "cc {name}");
            out
        };
        let hot_c = cc("hot.c", "hot");
        let syscalls_c = cc("syscalls.c", "syscalls");
        let hot_rs = dir.path().join("hot-rs");
        let st = Command::new("rustc")
            .args(["-O", "-C", "force-frame-pointers=yes", "-g", "-o"])
            .arg(&hot_rs)
            .arg(src.join("hot.rs"))
            .status()
            .expect("run rustc");
        assert!(st.success(), "rustc hot.rs");
        Workloads {
            _dir: dir,
            hot_c,
            syscalls_c,
            hot_rs,
        }
    })
}

/// A kernel test's hold on the machine: the serial lock and the built workloads.
struct Machine {
    _serial: MutexGuard<'static, ()>,
    w: &'static Workloads,
}

/// The machine for one CPU-measuring kernel test, or None (after saying why) when it must be
/// skipped.
fn machine(test: &str) -> Option<Machine> {
    if !kernel_or_skip(test) {
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some(Machine {
        _serial: serial,
        w: workloads(),
    })
}

/// What one `kprof-agent record` wrote.
struct Recording {
    dir: tempfile::TempDir,
    stdout: String,
}

impl Recording {
    fn profile(&self) -> PprofProfile {
        let out = self.dir.path();
        let bytes = std::fs::read(out.join("profile.pb.gz")).expect("profile.pb.gz written");
        let svg = std::fs::metadata(out.join("flamegraph.svg")).expect("flamegraph.svg");
        assert!(svg.len() > 0, "empty flamegraph.svg");
        pprof::decode(&bytes).expect("valid pprof")
    }

    fn summary(&self) -> serde_json::Value {
        let raw = std::fs::read(self.dir.path().join("summary.json")).expect("summary.json");
        serde_json::from_slice(&raw).expect("summary.json is JSON")
    }
}

/// `kprof-agent record --no-python -o DIR ARGS` into a fresh directory; it must succeed.
fn record(args: &[&str]) -> Recording {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(AGENT)
        .args(["record", "--no-python", "-o"])
        .arg(dir.path())
        .args(args)
        .output()
        .expect("run kprof-agent");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    eprintln!("kprof-agent record {args:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(o.status.success(), "kprof-agent record failed: {stderr}");
    Recording { dir, stdout }
}

/// `record` of a command started by the agent, for `secs` at `hz`.
fn record_command(secs: u32, hz: u32, command: &[&str]) -> Recording {
    let (d, hz) = (format!("{secs}s"), hz.to_string());
    let mut args = vec!["-d", d.as_str(), "--hz", hz.as_str(), "--"];
    args.extend_from_slice(command);
    record(&args)
}

/// (pid label, leaf-first function names, count) per sample. Inlined calls are folded into
/// the function they were inlined into (the last line of a location), so index 0 is the
/// function whose machine code was running.
fn samples(p: &PprofProfile) -> Vec<(i64, Vec<String>, i64)> {
    let locs: HashMap<u64, &pprof::Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let funcs: HashMap<u64, &pprof::Function> = p.function.iter().map(|f| (f.id, f)).collect();
    p.sample
        .iter()
        .map(|s| {
            let pid = s
                .label
                .iter()
                .find(|l| p.str(l.key) == "pid")
                .map_or(-1, |l| l.num);
            let names = s
                .location_id
                .iter()
                .filter_map(|id| locs.get(id)?.line.last())
                .filter_map(|line| funcs.get(&line.function_id))
                .map(|f| p.str(f.name).to_owned())
                .collect();
            (pid, names, s.value[0])
        })
        .collect()
}

fn spawn(path: &Path, args: &[&str]) -> Child {
    Command::new(path)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn workload")
}

/// Share of samples (of `pid`, or all when None) whose leaf satisfies `pred`.
fn leaf_share(
    s: &[(i64, Vec<String>, i64)],
    pid: Option<i64>,
    pred: impl Fn(&str) -> bool,
) -> (f64, i64) {
    let mut total = 0;
    let mut hit = 0;
    for (p, names, n) in s {
        if pid.is_some_and(|want| *p != want) {
            continue;
        }
        total += n;
        if names.first().is_some_and(|f| pred(f)) {
            hit += n;
        }
    }
    (
        if total == 0 {
            0.0
        } else {
            hit as f64 / total as f64
        },
        total,
    )
}

#[test]
fn c_program_hot_functions() {
    let Some(m) = machine("c_program_hot_functions") else {
        return;
    };
    let r = record_command(10, 199, &[m.w.hot_c.to_str().unwrap(), "4"]);
    let s = samples(&r.profile());
    let (share, total) = leaf_share(&s, None, |f| f == "burn_alpha" || f == "burn_beta");
    let (alpha, _) = leaf_share(&s, None, |f| f == "burn_alpha");
    eprintln!(
        "C: {total} samples, {:.1}% in burn_alpha|burn_beta, alpha {:.1}%",
        share * 100.0,
        alpha * 100.0
    );
    assert!(total >= 40, "too few samples: {total}");
    assert!(
        share >= 0.90,
        "only {:.1}% attributed to the hot functions",
        share * 100.0
    );
    // 2 calls of alpha per call of beta, same work per call.
    assert!((0.50..=0.80).contains(&alpha), "burn_alpha share {alpha}");
    // Callers are present down to main. (`run`, the direct caller, is not: burn_* are leaf
    // functions without a frame of their own — GCC omits leaf frame pointers even with
    // -fno-omit-frame-pointer — so a frame-pointer walk starts at the caller's caller, as with
    // `perf record -g`.)
    let with_callers = s
        .iter()
        .filter(|(_, n, _)| n.first().is_some_and(|f| f.starts_with("burn_")))
        .all(|(_, n, _)| n.contains(&"main".to_owned()));
    assert!(with_callers, "burn_* stacks must reach main");
    // The top table names them first.
    let first_row = r.stdout.lines().nth(1).unwrap_or("");
    assert!(
        first_row.contains("burn_alpha") && first_row.contains("hot.c:"),
        "{first_row}"
    );
}

#[test]
fn rust_program_hot_functions() {
    let Some(m) = machine("rust_program_hot_functions") else {
        return;
    };
    let r = record_command(10, 199, &[m.w.hot_rs.to_str().unwrap(), "4"]);
    let s = samples(&r.profile());
    let (share, total) = leaf_share(&s, None, |f| {
        f.ends_with("::checksum_pages") || f.ends_with("::mix_keys")
    });
    let (cs, _) = leaf_share(&s, None, |f| f.ends_with("::checksum_pages"));
    eprintln!(
        "Rust: {total} samples, {:.1}% in checksum_pages|mix_keys, checksum_pages {:.1}%",
        share * 100.0,
        cs * 100.0
    );
    assert!(total >= 40, "too few samples: {total}");
    assert!(share >= 0.90, "only {:.1}% attributed", share * 100.0);
    assert!((0.60..=0.90).contains(&cs), "checksum_pages share {cs}");
    // Demangled names with their callers (Rust keeps frame pointers in leaves too).
    let with_callers = s
        .iter()
        .filter(|(_, n, _)| n.first().is_some_and(|f| f.ends_with("::checksum_pages")))
        .all(|(_, n, _)| {
            n.get(1).is_some_and(|f| f == "hot::run") && n.iter().any(|f| f == "hot::main")
        });
    assert!(with_callers, "checksum_pages <- hot::run <- hot::main");
}

#[test]
fn syscall_heavy_program_shows_kernel_frames() {
    let Some(m) = machine("syscall_heavy_program_shows_kernel_frames") else {
        return;
    };
    let r = record_command(10, 199, &[m.w.syscalls_c.to_str().unwrap(), "3"]);
    let p = r.profile();
    let s = samples(&p);
    let total: i64 = s.iter().map(|x| x.2).sum();
    let read_path = |n: &Vec<String>| {
        n.iter().any(|f| {
            f.contains("vfs_read")
                || f.contains("ksys_read")
                || f.contains("sys_read")
                || f.contains("read_iter_zero")
        })
    };
    let in_read: i64 = s.iter().filter(|(_, n, _)| read_path(n)).map(|x| x.2).sum();
    let share = in_read as f64 / total.max(1) as f64;
    eprintln!(
        "syscalls: {total} samples, {:.1}% in the kernel read path",
        share * 100.0
    );
    assert!(total >= 30, "too few samples: {total}");
    assert!(
        share >= 0.5,
        "kernel read path in only {:.1}%",
        share * 100.0
    );
    // Kernel frames sit on top of the user frames that made the call.
    let ok = s.iter().filter(|(_, n, _)| read_path(n)).all(|(_, n, _)| {
        let k = n
            .iter()
            .position(|f| f.contains("sys_read") || f.contains("vfs_read"))
            .unwrap();
        // libc's read() has no frame pointer: its caller do_reads is skipped, main is there.
        n[k..].iter().any(|f| f == "main" || f == "do_reads")
            && n.iter()
                .any(|f| f.contains("do_syscall_64") || f.contains("entry_SYSCALL"))
    });
    assert!(
        ok,
        "kernel read frames must be above do_syscall_64 and the user frames (main)"
    );
    // The kernel mapping exists.
    assert!(
        p.mapping
            .iter()
            .any(|m| p.str(m.filename) == "[kernel.kallsyms]")
    );
    // No kernel address reaches the profile (it would undo KASLR for its readers): kernel
    // frames carry their offset in their function.
    let kernel_mappings: Vec<u64> = p
        .mapping
        .iter()
        .filter(|m| p.str(m.filename) == "[kernel.kallsyms]")
        .map(|m| m.id)
        .collect();
    let kernel_locs: Vec<_> = p
        .location
        .iter()
        .filter(|l| kernel_mappings.contains(&l.mapping_id))
        .collect();
    assert!(!kernel_locs.is_empty(), "no kernel locations");
    for l in &kernel_locs {
        assert!(
            l.address < 1 << 32,
            "a kernel address in the profile: {:#x}",
            l.address
        );
    }
    for m in &p.mapping {
        assert!(
            m.memory_start < 0xffff_0000_0000_0000 && m.memory_limit < 0xffff_0000_0000_0000,
            "a kernel address in mapping {}: {:#x}-{:#x}",
            p.str(m.filename),
            m.memory_start,
            m.memory_limit
        );
    }
    let names: Vec<String> = samples(&p).into_iter().flat_map(|(_, n, _)| n).collect();
    assert!(
        !names.iter().any(|n| n.contains("0xffff")),
        "a kernel address in a frame name"
    );
}

#[test]
fn go_tool_pprof_reads_the_profile() {
    let go = Path::new("/usr/local/go/bin/go");
    if !go.exists() {
        eprintln!("SKIPPED go_tool_pprof_reads_the_profile: /usr/local/go/bin/go not found");
        return;
    }
    let Some(m) = machine("go_tool_pprof_reads_the_profile") else {
        return;
    };
    let r = record_command(5, 99, &[m.w.hot_c.to_str().unwrap(), "2"]);
    let top = Command::new(go)
        .args(["tool", "pprof", "-top"])
        .arg(r.dir.path().join("profile.pb.gz"))
        .env("PPROF_TMPDIR", r.dir.path())
        .output()
        .expect("go tool pprof");
    let text = String::from_utf8_lossy(&top.stdout);
    eprintln!(
        "go tool pprof -top:\n{text}\n{}",
        String::from_utf8_lossy(&top.stderr)
    );
    assert!(top.status.success());
    assert!(text.contains("burn_alpha") && text.contains("burn_beta"));
}

#[test]
fn untargeted_processes_are_not_in_the_output() {
    let Some(m) = machine("untargeted_processes_are_not_in_the_output") else {
        return;
    };
    let mut bystander = spawn(&m.w.hot_rs, &["5"]);
    let mut target = spawn(&m.w.hot_c, &["5"]);
    thread::sleep(Duration::from_millis(200));
    let r = record(&["--pid", &target.id().to_string(), "-d", "3s"]);
    let _ = bystander.kill();
    let _ = target.kill();
    let _ = bystander.wait();
    let _ = target.wait();
    let s = samples(&r.profile());
    assert!(!s.is_empty());
    for (pid, names, _) in &s {
        assert_eq!(
            *pid,
            i64::from(target.id()),
            "sample of an untargeted pid: {names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|f| f.contains("checksum_pages") || f.contains("mix_keys"))
        );
    }
}

#[test]
fn a_process_exiting_mid_window_keeps_its_samples() {
    let Some(m) = machine("a_process_exiting_mid_window_keeps_its_samples") else {
        return;
    };
    // The short one exits about halfway through the window (loading takes a moment).
    let mut short = spawn(&m.w.hot_c, &["2.5"]);
    let mut long = spawn(&m.w.hot_rs, &["7"]);
    let (sp, lp) = (short.id(), long.id());
    // (record asserts that the window survives the exit)
    let r = record(&[
        "--pid",
        &sp.to_string(),
        "--pid",
        &lp.to_string(),
        "-d",
        "5s",
    ]);
    let _ = short.wait();
    let _ = long.kill();
    let _ = long.wait();
    let s = samples(&r.profile());
    let mut per_pid: HashMap<i64, i64> = HashMap::new();
    for (pid, _, n) in &s {
        *per_pid.entry(*pid).or_default() += n;
    }
    eprintln!("samples per pid: {per_pid:?}");
    assert!(
        per_pid.get(&i64::from(sp)).copied().unwrap_or(0) >= 5,
        "short-lived process samples kept"
    );
    assert!(per_pid.get(&i64::from(lp)).copied().unwrap_or(0) >= 5);
    // Symbolized although the process was gone when the profile was written.
    let (share, _) = leaf_share(&s, Some(i64::from(sp)), |f| f.starts_with("burn_"));
    // (a threshold for few samples on a busy machine: a stray kernel-interrupt leaf is possible)
    assert!(share >= 0.75, "exited process symbolized: {share}");
}

#[test]
fn children_of_a_command_are_followed() {
    let Some(m) = machine("children_of_a_command_are_followed") else {
        return;
    };
    // `; true` keeps the shell from exec'ing: the workload is a forked child.
    let script = format!("{} 2; true", m.w.hot_c.display());
    let r = record_command(6, 99, &["/bin/sh", "-c", &script]);
    let s = samples(&r.profile());
    let (share, total) = leaf_share(&s, None, |f| f.starts_with("burn_"));
    let summary = r.summary();
    let followed = summary["children_followed"].as_u64().unwrap_or(0);
    eprintln!(
        "children: {total} samples, {:.1}% in burn_*, {followed} followed in kernel",
        share * 100.0
    );
    assert!(total >= 20 && share >= 0.9);
    // The shell forked the workload: the raw fork tracepoint added it (threads are not counted).
    assert!(followed >= 1, "no child followed in kernel: {summary}");
}

/// A process that `exec`s another program: samples before the exec are named from the first
/// image, samples after it from the second (the same pid, a new address space).
#[test]
fn a_process_that_execs_is_symbolized_from_its_new_image() {
    let Some(m) = machine("a_process_that_execs_is_symbolized_from_its_new_image") else {
        return;
    };
    let r = record_command(
        10,
        199,
        &[
            // No ASLR: both images load at the same address, so only noticing the exec (not
            // an address outside the known mappings) can tell them apart.
            "setarch",
            "-R",
            m.w.hot_c.to_str().unwrap(),
            "1.5",
            "exec",
            m.w.hot_rs.to_str().unwrap(),
            "2.5",
        ],
    );
    let p = r.profile();
    // The process is named after its last image (it was `setarch`, then `hot`).
    let names: std::collections::BTreeSet<&str> = p
        .sample
        .iter()
        .flat_map(|s| &s.label)
        .filter(|l| p.str(l.key) == "process_name")
        .map(|l| p.str(l.str))
        .collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["hot-rs"],
        "process name after exec"
    );
    let s = samples(&p);
    let (c, total) = leaf_share(&s, None, |f| f.starts_with("burn_"));
    let (rs, _) = leaf_share(&s, None, |f| {
        f.ends_with("::checksum_pages") || f.ends_with("::mix_keys")
    });
    eprintln!(
        "exec: {total} samples, {:.1}% in the C image (burn_*), {:.1}% in the Rust image",
        c * 100.0,
        rs * 100.0
    );
    // 1.5 s then 2.5 s of CPU: ~37 % and ~63 %. Missing the exec would name the Rust image's
    // addresses from the C image's maps.
    assert!(total >= 200, "too few samples: {total}");
    assert!((0.25..=0.50).contains(&c), "C image share {c}");
    assert!((0.50..=0.75).contains(&rs), "Rust image share {rs}");
    assert!(
        c + rs >= 0.95,
        "misattributed: {:.1}%",
        (1.0 - c - rs) * 100.0
    );
}

#[test]
fn missing_capability_is_a_one_line_error() {
    if !kernel_or_skip("missing_capability_is_a_one_line_error") {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED missing_capability_is_a_one_line_error: setpriv not found");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    // World-writable output dir so that only the capability is missing.
    Command::new("chmod")
        .arg("777")
        .arg(out.path())
        .status()
        .unwrap();
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(AGENT)
        .args(["record", "-d", "1s", "-o"])
        .arg(out.path())
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{err}");
    assert!(!o.status.success());
    assert!(err.contains("missing capability"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn native_sampler_cost_is_reported() {
    let Some(m) = machine("native_sampler_cost_is_reported") else {
        return;
    };
    let r = record_command(5, 99, &[m.w.hot_c.to_str().unwrap(), "2"]);
    let summary = r.summary();
    eprintln!("{summary}");
    assert!(summary["bpf_run_count"].is_u64(), "no bpf_run_count");
    assert_eq!(summary["dropped"], 0, "no samples dropped at 99 Hz");
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_with_its_children_at_the_end() {
    let Some(_m) = machine("a_command_that_ignores_sigterm_is_killed_with_its_children_at_the_end")
    else {
        return;
    };
    // `unshare --fork` waits for its child, PID 1 of a new PID namespace, which ignores
    // SIGTERM: before, `record` waited for it for ever.
    let marker = "4242.4242";
    let start = Instant::now();
    let r = record_command(2, 99, &["unshare", "--pid", "--fork", "sleep", marker]);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "record took {took:?} for a 2 s recording"
    );
    drop(r);
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect();
    assert!(leftovers.is_empty(), "still running: {leftovers:?}");
}
