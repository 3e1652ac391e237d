//! Kernel tests of native unwinding through code built without frame pointers (issue #15): the
//! real eBPF sampler on this machine's kernel against
//!
//! - `tests/workloads/nofp.c`, built `-O2 -fomit-frame-pointer` (symbols kept, no DWARF): a
//!   syscall phase (time in libc's `getppid` and the kernel under it) and a computing phase,
//!   called from `main -> run`, in one thread or in threads made by `pthread_create`;
//! - `tests/workloads/python/native_libs.py` on Debian's `/usr/bin/python3.11` and pyenv's
//!   newest 3.12: `zlib.compress` (the distribution's libz) and a NumPy sort (the manylinux
//!   wheel's `_multiarray_umath`), NumPy from `${KPROF_CACHE:-/var/cache/kprof}/pylibs/3.X`
//!   (`e2e/testbed/install-pylibs.sh`, run by `make deps`) put on PYTHONPATH.
//!
//! Each workload measures its own CPU time per phase (the truth). The tests check that samples
//! are attributed to the phase that took them within ±5 points, that stacks carry their whole
//! caller chain (to `main`, to the thread's `start_thread`/`clone3`, to the Python caller and on
//! to the process's entry), and that no stack has bogus frames (a frame repeated over and over,
//! callers at addresses outside any code). Every test prints its figures.
//!
//! Need root (or CAP_BPF + CAP_PERFMON) and an agent built with its eBPF programs. Otherwise each
//! test prints `SKIPPED: <reason>` and passes — unless `KPROF_REQUIRE_KERNEL=1`, then it fails.
//!
//!     sudo -E cargo test -p kprof-agent --test native_unwind -- --nocapture --test-threads=1
#[path = "workloads/python/harness.rs"]
mod harness;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard, OnceLock, atomic::AtomicBool},
    time::Duration,
};

use kprof_agent::pipeline::aggregate::TRUNCATED_NATIVE;
use kprof_agent::pprof::{self, PprofProfile};
use kprof_agent::profile::{AggregatedProfile, Frame, FrameKind};
use kprof_agent::record::{RecordOptions, record};

const AGENT: &str = env!("CARGO_BIN_EXE_kprof-agent");

/// Attribution tolerance against the measured truth, in percentage points.
const TOLERANCE_PP: f64 = 5.0;
/// Share of samples (percent) that must carry their whole caller chain.
const WHOLE_PCT: f64 = 95.0;
/// A frame repeated more often than this, consecutively, is a walk going round in circles (the
/// workloads have no recursion).
const MAX_REPEAT: usize = 3;

/// CPU workloads compete for two cores: run one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn required() -> bool {
    std::env::var("KPROF_REQUIRE_KERNEL").is_ok_and(|v| v == "1")
}

fn skip_reason() -> Option<String> {
    if !harness::is_root() {
        return Some("not root (the eBPF sampler needs CAP_BPF + CAP_PERFMON)".into());
    }
    if !kprof_agent::kernel::loader::ebpf_available() {
        return Some("kprof-agent was built without eBPF programs (AYA_BUILD_SKIP)".into());
    }
    None
}

/// Skips loudly with `why`, or fails under `KPROF_REQUIRE_KERNEL=1`.
fn skip(test: &str, why: &str) {
    if required() {
        panic!("{test}: KPROF_REQUIRE_KERNEL=1 but cannot run: {why}");
    }
    eprintln!("\n*** SKIPPED native-unwind test {test}: {why} ***\n");
}

/// The serial lock, or None (after saying why) when the test must be skipped.
fn machine(test: &str) -> Option<MutexGuard<'static, ()>> {
    if let Some(why) = skip_reason() {
        skip(test, &why);
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `tests/workloads/nofp.c` built as distributions build libraries: optimized, no frame
/// pointers, no debug info, symbols kept.
fn nofp() -> &'static Path {
    static W: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &W.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/nofp.c");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("nofp");
        let st = Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "cc nofp.c");
        (dir, out)
    })
    .1
}

/// One frame of a pprof sample: its function name and its mapping's file name.
#[derive(Clone, Debug)]
struct Fr {
    name: String,
    module: String,
}

impl Fr {
    fn kernel(&self) -> bool {
        self.module == "[kernel.kallsyms]"
    }

    /// Code of a file (or the vDSO): where a return address may point.
    fn in_code(&self) -> bool {
        self.kernel() || self.module.starts_with('/') || self.module == "[vdso]"
    }

    fn in_lib(&self, prefix: &str) -> bool {
        base(&self.module).starts_with(prefix)
    }

    /// Named `module+0x…`: no symbol covers the address (e.g. a static function of a stripped
    /// library).
    fn unresolved(&self) -> bool {
        self.name
            .rsplit_once("+0x")
            .is_some_and(|(_, h)| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
    }
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// One pprof sample: pid, thread id, frames leaf first, count.
struct Sample {
    pid: i64,
    tid: i64,
    frames: Vec<Fr>,
    n: i64,
}

impl Sample {
    /// The user-space frames, leaf first (kernel frames dropped).
    fn user(&self) -> Vec<&Fr> {
        self.frames.iter().filter(|f| !f.kernel()).collect()
    }

    fn user_names(&self) -> Vec<&str> {
        self.user().iter().map(|f| f.name.as_str()).collect()
    }

    /// `name@lib <- …`, kernel frames counted, for failure reports.
    fn show(&self) -> String {
        let k = self.frames.iter().filter(|f| f.kernel()).count();
        let user: Vec<String> = self
            .user()
            .iter()
            .map(|f| {
                if f.unresolved() {
                    f.name.clone()
                } else {
                    format!("{}@{}", f.name, base(&f.module))
                }
            })
            .collect();
        format!("[{k} kernel] {}", user.join(" <- "))
    }
}

/// The samples of a decoded profile. Inlined calls are folded into the function they were
/// inlined into, as the pprof location's last line.
fn pprof_samples(p: &PprofProfile) -> Vec<Sample> {
    let locs: HashMap<u64, &pprof::Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let funcs: HashMap<u64, &pprof::Function> = p.function.iter().map(|f| (f.id, f)).collect();
    let maps: HashMap<u64, &pprof::Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let label = |s: &pprof::Sample, key: &str| {
        s.label
            .iter()
            .find(|l| p.str(l.key) == key)
            .map_or(-1, |l| l.num)
    };
    p.sample
        .iter()
        .map(|s| {
            let frames = s
                .location_id
                .iter()
                .filter_map(|id| locs.get(id))
                .map(|l| Fr {
                    name: l
                        .line
                        .last()
                        .and_then(|line| funcs.get(&line.function_id))
                        .map_or_else(|| "[no line]".to_owned(), |f| p.str(f.name).to_owned()),
                    module: maps
                        .get(&l.mapping_id)
                        .map_or_else(String::new, |m| p.str(m.filename).to_owned()),
                })
                .collect();
            Sample {
                pid: label(s, "pid"),
                tid: label(s, "thread_id"),
                frames,
                n: s.value[0],
            }
        })
        .collect()
}

/// `kprof-agent record --no-python` of `command` for at most `secs` at `hz`; the decoded CPU
/// profile. (The recording ends when the command exits.)
fn record_pprof(secs: u32, hz: u32, command: &[&str]) -> PprofProfile {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(AGENT)
        .args(["record", "--no-python", "-o"])
        .arg(dir.path())
        .args(["-d", &format!("{secs}s"), "--hz", &hz.to_string(), "--"])
        .args(command)
        .output()
        .expect("run kprof-agent");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    eprintln!("kprof-agent record {command:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(o.status.success(), "kprof-agent record failed: {stderr}");
    let bytes = std::fs::read(dir.path().join("profile.pb.gz")).expect("profile.pb.gz written");
    pprof::decode(&bytes).expect("valid pprof")
}

/// `key=value` pairs of the truth line `nofp` wrote.
fn read_truth(path: &Path) -> HashMap<String, f64> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the workload wrote no truth to {}: {e}", path.display()));
    eprintln!("{}", text.trim());
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Why a stack is bogus, if it is: a frame repeated more than `MAX_REPEAT` times in a row, or a
/// caller outside any code (a return address read from garbage; `[truncated native stack]`, the
/// visible cut the issue asks for, is not one). Start-up samples (leaf in the
/// dynamic loader, or outside the mappings known so far) are not judged.
fn bogus(s: &Sample) -> Option<String> {
    let mut run = 1;
    for w in s.frames.windows(2) {
        run = if w[0].name == w[1].name { run + 1 } else { 1 };
        if run > MAX_REPEAT {
            return Some(format!("{} repeated {run}+ times", w[0].name));
        }
    }
    let user = s.user();
    let leaf = user.first()?;
    if !leaf.in_code() || leaf.in_lib("ld-linux") {
        return None;
    }
    // The unwinder's visible cut is not junk.
    user.iter()
        .skip(1)
        .find(|f| !f.in_code() && f.name != TRUNCATED_NATIVE)
        .map(|f| format!("caller {} outside any code ({})", f.name, f.module))
}

/// Whether `names` holds `seq` as consecutive frames; the index of its first frame.
fn find_seq(names: &[&str], seq: &[&str]) -> Option<usize> {
    names.windows(seq.len()).position(|w| w == seq)
}

/// `share` within `TOLERANCE_PP` points of `truth` (false when either is not a number).
fn within_tolerance(share: f64, truth: f64) -> bool {
    (share - truth).abs() <= TOLERANCE_PP
}

/// Percent of `part` in `total`.
fn pct(part: i64, total: i64) -> f64 {
    100.0 * part as f64 / total.max(1) as f64
}

/// The most frequent stacks satisfying `pred`, for failure reports.
fn top_stacks<'a>(
    s: impl Iterator<Item = &'a Sample>,
    pred: impl Fn(&Sample) -> bool,
) -> Vec<(i64, String)> {
    let mut by: HashMap<String, i64> = HashMap::new();
    for x in s.filter(|x| pred(x)) {
        *by.entry(x.show()).or_default() += x.n;
    }
    let mut v: Vec<(i64, String)> = by.into_iter().map(|(k, n)| (n, k)).collect();
    v.sort_by(|a, b| b.cmp(a));
    v.truncate(5);
    v
}

/// Where the leaf frames of `s` are, in percent: kernel, libc, the workload, elsewhere.
fn leaf_split(s: &[&Sample], own: &str) -> String {
    let mut by: BTreeMap<&str, i64> = BTreeMap::new();
    let total: i64 = s.iter().map(|x| x.n).sum();
    for x in s {
        let where_ = match x.frames.first() {
            Some(f) if f.kernel() => "kernel",
            Some(f) if f.in_lib("libc.so") => "libc",
            Some(f) if base(&f.module) == own => own,
            _ => "other",
        };
        *by.entry(where_).or_default() += x.n;
    }
    by.iter()
        .map(|(k, n)| format!("{k}={:.1}%", pct(*n, total)))
        .collect::<Vec<_>>()
        .join(" ")
}

const PHASES: [&str; 2] = ["spin_syscalls", "spin_math"];

/// Judges the phases' attribution against the truth; pushes the errors, returns the report.
fn judge_phases(s: &[&Sample], truth: &HashMap<String, f64>, errs: &mut Vec<String>) -> String {
    let total: i64 = s.iter().map(|x| x.n).sum();
    let mut line = String::new();
    for phase in PHASES {
        let hit: i64 = s
            .iter()
            .filter(|x| x.user_names().contains(&phase))
            .map(|x| x.n)
            .sum();
        let share = pct(hit, total);
        let want = 100.0 * truth.get(phase).copied().unwrap_or(f64::NAN);
        line.push_str(&format!(" {phase}={share:.1}%(truth {want:.1})"));
        if !within_tolerance(share, want) {
            errs.push(format!(
                "{phase}: {share:.1}% of samples have it in their stack, it took {want:.1}% of \
                 the CPU (±{TOLERANCE_PP} points)"
            ));
        }
    }
    line
}

/// Bogus stacks among `s`: pushes an error (with examples) when there is any; the report.
fn judge_bogus(s: &[&Sample], errs: &mut Vec<String>) -> String {
    let total: i64 = s.iter().map(|x| x.n).sum();
    let bad: Vec<(&Sample, String)> = s.iter().filter_map(|x| Some((*x, bogus(x)?))).collect();
    let n: i64 = bad.iter().map(|(x, _)| x.n).sum();
    if n > 0 {
        let examples: Vec<String> = bad
            .iter()
            .take(3)
            .map(|(x, why)| format!("{why}: {}", x.show()))
            .collect();
        errs.push(format!(
            "{n} samples ({:.1}%) with bogus frames, e.g. {examples:#?}",
            pct(n, total)
        ));
    }
    format!(" bogus={n}({:.1}%)", pct(n, total))
}

/// A C program without frame pointers: samples in libc and the kernel under `spin_syscalls` are
/// attributed to it as often as it ran, and every stack goes up to `main`.
#[test]
fn c_without_frame_pointers_is_attributed_to_its_callers() {
    let test = "c_without_frame_pointers_is_attributed_to_its_callers";
    let Some(_serial) = machine(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth");
    let p = record_pprof(
        15,
        199,
        &[nofp().to_str().unwrap(), "8", truth_path.to_str().unwrap()],
    );
    let truth = read_truth(&truth_path);
    let all = pprof_samples(&p);
    let s: Vec<&Sample> = all.iter().collect();
    let total: i64 = s.iter().map(|x| x.n).sum();
    let mut errs = Vec::new();
    if total < 400 {
        errs.push(format!("too few samples: {total}"));
    }
    // (a) attribution.
    let mut line = format!("nofp: {total} samples");
    line.push_str(&judge_phases(&s, &truth, &mut errs));
    // (b) the whole chain: phase <- run <- main.
    let whole = |x: &Sample| {
        let names = x.user_names();
        PHASES
            .iter()
            .any(|ph| find_seq(&names, &[ph, "run", "main"]).is_some())
    };
    let n_whole: i64 = s.iter().filter(|x| whole(x)).map(|x| x.n).sum();
    let whole_pct = pct(n_whole, total);
    line.push_str(&format!(" whole(phase<-run<-main)={whole_pct:.1}%"));
    if whole_pct < WHOLE_PCT {
        errs.push(format!(
            "only {whole_pct:.1}% of samples have phase <- run <- main (want ≥{WHOLE_PCT}%)"
        ));
    }
    // (c) no bogus frames.
    line.push_str(&judge_bogus(&s, &mut errs));
    line.push_str(&format!(" leaves: {}", leaf_split(&s, "nofp")));
    // Below main: what the walk found (informational).
    let mut below: BTreeMap<String, i64> = BTreeMap::new();
    for x in &s {
        let names = x.user_names();
        if let Some(i) = names.iter().position(|n| *n == "main") {
            *below.entry(names[i + 1..].join(" <- ")).or_default() += x.n;
        }
    }
    eprintln!(
        "{} {line}\n      below main: {below:?}",
        if errs.is_empty() { "PASS" } else { "FAIL" }
    );
    if !errs.is_empty() {
        for (n, st) in top_stacks(all.iter(), |x| !whole(x)) {
            eprintln!("      not whole {n}: {st}");
        }
    }
    assert!(errs.is_empty(), "{errs:#?}");
}

/// Threads made by `pthread_create` in a program without frame pointers: their stacks go
/// phase <- run <- thread_main and end cleanly in libc's thread start (start_thread, clone3).
#[test]
fn threads_without_frame_pointers_end_at_their_start() {
    let test = "threads_without_frame_pointers_end_at_their_start";
    let Some(_serial) = machine(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let truth_path = dir.path().join("truth");
    let p = record_pprof(
        12,
        199,
        &[
            nofp().to_str().unwrap(),
            "6",
            truth_path.to_str().unwrap(),
            "2",
        ],
    );
    let truth = read_truth(&truth_path);
    let all = pprof_samples(&p);
    // The worker threads' samples (the main thread waits in pthread_join).
    let s: Vec<&Sample> = all.iter().filter(|x| x.tid > 0 && x.tid != x.pid).collect();
    let total: i64 = s.iter().map(|x| x.n).sum();
    let mut errs = Vec::new();
    if total < 400 {
        errs.push(format!("too few worker-thread samples: {total}"));
    }
    let mut line = format!("nofp threads: {total} worker samples");
    line.push_str(&judge_phases(&s, &truth, &mut errs));
    // What follows thread_main: libc's thread start, one or two frames (start_thread, and the
    // clone3 it returns to; named when libc's symbols allow), and then nothing.
    const STARTS: [&str; 5] = ["start_thread", "clone3", "__clone3", "clone", "__clone"];
    let tail_of = |x: &Sample| -> Option<Vec<String>> {
        let user = x.user();
        let names: Vec<&str> = user.iter().map(|f| f.name.as_str()).collect();
        let i = PHASES
            .iter()
            .find_map(|ph| find_seq(&names, &[ph, "run", "thread_main"]))?;
        let tail = &user[i + 3..];
        let clean = (1..=2).contains(&tail.len())
            && tail.iter().all(|f| {
                f.in_lib("libc.so") && (f.unresolved() || STARTS.contains(&f.name.as_str()))
            });
        clean.then(|| tail.iter().map(|f| f.name.clone()).collect())
    };
    let mut tails: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    for x in &s {
        if let Some(t) = tail_of(x) {
            *tails.entry(t).or_default() += x.n;
        }
    }
    let n_whole: i64 = tails.values().sum();
    let whole_pct = pct(n_whole, total);
    line.push_str(&format!(
        " whole(phase<-run<-thread_main<-libc start, then the end)={whole_pct:.1}%"
    ));
    if whole_pct < WHOLE_PCT {
        errs.push(format!(
            "only {whole_pct:.1}% of worker samples go phase <- run <- thread_main <- \
             start_thread [<- clone3] and end there (want ≥{WHOLE_PCT}%)"
        ));
    }
    line.push_str(&judge_bogus(&s, &mut errs));
    line.push_str(&format!(" leaves: {}", leaf_split(&s, "nofp")));
    eprintln!(
        "{} {line}\n      thread starts: {tails:?}",
        if errs.is_empty() { "PASS" } else { "FAIL" }
    );
    if !errs.is_empty() {
        for (n, st) in top_stacks(s.iter().copied(), |x| tail_of(x).is_none()) {
            eprintln!("      not whole {n}: {st}");
        }
    }
    assert!(errs.is_empty(), "{errs:#?}");
}

/// The native libraries the Python workload calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Lib {
    Libz,
    Numpy,
}

impl Lib {
    /// The Python function that calls into it.
    fn caller(self) -> &'static str {
        match self {
            Lib::Libz => "compress_loop",
            Lib::Numpy => "numpy_loop",
        }
    }
}

/// Native frame names a process's stack ends with (its entry), seen after the Python frames
/// when the native walk went through the interpreter to the bottom.
fn is_entry(f: &Frame) -> bool {
    f.kind == FrameKind::Native
        && (&*f.function == "main"
            || &*f.function == "_start"
            || f.function.starts_with("__libc_start"))
}

/// Python function `name` of the workload (`native_libs.compress_loop`).
fn is_py(f: &Frame, name: &str) -> bool {
    f.kind == FrameKind::Python
        && f.function.rsplit_once('.').map_or(&*f.function, |(_, n)| n) == name
}

/// The interpreters of the NumPy test — Debian's python3.11 and the newest pyenv 3.12, or those
/// of `KPROF_PYTHONS` — with NumPy's directory for each (None: not installed).
fn numpy_interpreters() -> Vec<(String, Option<(harness::Interp, PathBuf)>)> {
    let cache = std::env::var("KPROF_CACHE").unwrap_or_else(|_| "/var/cache/kprof".into());
    let pylibs = |i: &harness::Interp| {
        let dir = Path::new(&cache).join(format!("pylibs/3.{}", harness::minor_of(i)?));
        dir.join("numpy").is_dir().then_some(dir)
    };
    let all: Vec<harness::Interp> = harness::interpreters()
        .into_iter()
        .filter(|i| i.pre_args.is_empty())
        .collect();
    let wanted: Vec<(String, Option<harness::Interp>)> = if std::env::var("KPROF_PYTHONS").is_ok() {
        all.into_iter().map(|i| (i.name.clone(), Some(i))).collect()
    } else {
        vec![
            (
                "Debian /usr/bin/python3.11".into(),
                all.iter()
                    .find(|i| i.path == Path::new("/usr/bin/python3.11"))
                    .cloned(),
            ),
            (
                "pyenv CPython 3.12".into(),
                all.iter()
                    .find(|i| i.name.starts_with("pyenv-3.12."))
                    .cloned(),
            ),
        ]
    };
    wanted
        .into_iter()
        .map(|(name, i)| {
            let with = i.and_then(|i| pylibs(&i).map(|d| (i, d)));
            (name, with)
        })
        .collect()
}

/// Samples whose leaf is native code of `lib`: how many, how many under their Python caller
/// (the innermost Python frame is the caller, only native frames above it), how many of those
/// whole (the native walk also went on through the interpreter to the process's entry), and how
/// many with bogus frames (repeats, callers outside any code).
///
/// "Under the caller" alone does not need the native walk: when it stops or goes astray, the
/// merge (`python/merge.rs`) keeps the native leaves and appends the Python frames. Only a walk
/// that reaches the eval loop's frames lets the merge splice the Python frames in place and keep
/// the native frames below them (`__libc_start_main`, `main`): "whole" is what proves it.
#[derive(Default)]
struct LibFigures {
    leaf: u64,
    under_caller: u64,
    whole: u64,
    bogus: u64,
    not_whole: BTreeMap<String, u64>,
    bogus_stacks: BTreeMap<String, u64>,
}

fn lib_of(f: &Frame, numpy_root: &str) -> Option<Lib> {
    if f.kind != FrameKind::Native {
        return None;
    }
    let m = f.module.as_deref()?;
    if base(m).starts_with("libz.so") {
        Some(Lib::Libz)
    } else if m.starts_with(numpy_root) {
        Some(Lib::Numpy)
    } else {
        None
    }
}

fn show_stack(stack: &[Frame]) -> String {
    stack
        .iter()
        .take(16)
        .map(|f| match (f.kind, f.module.as_deref()) {
            (FrameKind::Native, Some(m)) => format!("{}@{}", f.function, base(m)),
            (FrameKind::Kernel, _) => format!("{}[k]", f.function),
            _ => f.function.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// A stack with junk in it: a caller outside any code (a return address read from garbage),
/// or the same address over and over outside any file (a frame-pointer walk in a loop).
/// Recursion (NumPy's sorts call themselves) and a visible cut (`[truncated native stack]`)
/// are not junk.
fn python_stack_bogus(stack: &[Frame]) -> bool {
    let in_code = |f: &Frame| {
        f.module
            .as_deref()
            .is_some_and(|m| m.starts_with('/') || m == "[vdso]")
    };
    let repeated = stack.windows(MAX_REPEAT + 1).any(|w| {
        w.iter()
            .all(|f| f.function == w[0].function && f.kind == FrameKind::Native && !in_code(f))
    });
    let outside = stack
        .iter()
        .skip(1)
        .any(|f| f.kind == FrameKind::Native && !in_code(f) && &*f.function != TRUNCATED_NATIVE);
    repeated || outside
}

fn lib_figures(p: &AggregatedProfile, numpy_root: &str) -> BTreeMap<Lib, LibFigures> {
    let mut out: BTreeMap<Lib, LibFigures> = BTreeMap::new();
    for (key, &n) in &p.samples {
        let stack = &key.stack;
        let Some(lib) = stack.first().and_then(|f| lib_of(f, numpy_root)) else {
            continue;
        };
        let fig = out.entry(lib).or_default();
        fig.leaf += n;
        let first_py = stack.iter().position(|f| f.kind == FrameKind::Python);
        let under = first_py.is_some_and(|i| {
            is_py(&stack[i], lib.caller()) && stack[..i].iter().all(|f| f.kind == FrameKind::Native)
        });
        let last_py = stack.iter().rposition(|f| f.kind == FrameKind::Python);
        let whole = under && last_py.is_some_and(|i| stack[i + 1..].iter().any(is_entry));
        if under {
            fig.under_caller += n;
        }
        if whole {
            fig.whole += n;
        } else {
            *fig.not_whole.entry(show_stack(stack)).or_default() += n;
        }
        if python_stack_bogus(stack) {
            fig.bogus += n;
            *fig.bogus_stacks.entry(show_stack(stack)).or_default() += n;
        }
    }
    out
}

/// Python calling libz and NumPy (both built without frame pointers) on Debian's python3.11 and
/// pyenv's 3.12: samples in the native libraries sit under the Python function that called them,
/// with the whole native chain through the interpreter, and each phase gets its measured share.
#[test]
fn python_native_libraries_are_under_their_python_callers() {
    let test = "python_native_libraries_are_under_their_python_callers";
    let Some(_serial) = machine(test) else {
        return;
    };
    let mut failures = Vec::new();
    for (want, found) in numpy_interpreters() {
        let Some((interp, pylibs)) = found else {
            skip(
                test,
                &format!(
                    "{want}: not installed, or no NumPy for it under $KPROF_CACHE/pylibs \
                     (make deps / e2e/testbed/install-pylibs.sh)"
                ),
            );
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let truth_path = dir.path().join("truth.json");
        let secs = 10;
        let mut command = vec![
            "/usr/bin/env".to_string(),
            format!("PYTHONPATH={}", pylibs.display()),
            interp.path.to_string_lossy().into_owned(),
        ];
        command.push(
            harness::script("native_libs.py")
                .to_string_lossy()
                .into_owned(),
        );
        command.push(secs.to_string());
        command.push(truth_path.to_string_lossy().into_owned());
        let opts = RecordOptions {
            command,
            duration: Duration::from_secs(secs + 8),
            sample_hz: 199,
            follow_children: true,
            python: true,
            progress: false,
            ..RecordOptions::default()
        };
        let rec = record(&opts, &AtomicBool::new(false))
            .unwrap_or_else(|e| panic!("{}: record failed: {e}", interp.name));
        let truth: serde_json::Value = match std::fs::read_to_string(&truth_path) {
            Ok(t) => serde_json::from_str(&t).expect("truth is JSON"),
            Err(e) => {
                failures.push(format!(
                    "{}: no truth from native_libs.py: {e}",
                    interp.name
                ));
                continue;
            }
        };
        let p = rec.profile();
        let mut errs = Vec::new();
        // The phases against the truth, among the samples in either phase (the Python frames
        // come from the interpreter's own frame chain).
        let mut phase_n: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, &n) in &p.samples {
            for ph in ["compress_loop", "numpy_loop"] {
                if key.stack.iter().any(|f| is_py(f, ph)) {
                    *phase_n.entry(ph).or_default() += n;
                }
            }
        }
        let phase_total: u64 = phase_n.values().sum();
        let t = |k: &str| truth[k].as_f64().unwrap_or(f64::NAN);
        let truth_compress = 100.0 * t("compress_loop") / (t("compress_loop") + t("numpy_loop"));
        let compress = 100.0 * phase_n.get("compress_loop").copied().unwrap_or(0) as f64
            / phase_total.max(1) as f64;
        let mut line = format!(
            "{:<14} {} samples, {phase_total} in the phases: compress_loop={compress:.1}%(truth \
             {truth_compress:.1})",
            interp.name,
            p.total()
        );
        if !within_tolerance(compress, truth_compress) {
            errs.push(format!(
                "compress_loop has {compress:.1}% of the phases' samples, it took \
                 {truth_compress:.1}% (±{TOLERANCE_PP} points)"
            ));
        }
        let numpy_root = Path::new(truth["numpy_dir"].as_str().unwrap_or("/nonexistent"))
            .parent()
            .unwrap_or(Path::new("/nonexistent"))
            .to_string_lossy()
            .into_owned();
        let figs = lib_figures(p, &numpy_root);
        for lib in [Lib::Libz, Lib::Numpy] {
            let f = figs.get(&lib);
            let (leaf, under, whole, bogus) =
                f.map_or((0, 0, 0, 0), |f| (f.leaf, f.under_caller, f.whole, f.bogus));
            let share = |k: u64| 100.0 * k as f64 / leaf.max(1) as f64;
            line.push_str(&format!(
                "\n      {lib:?}-leaf={leaf} under {}={:.1}% whole(to the process entry)={:.1}% \
                 bogus={:.1}%",
                lib.caller(),
                share(under),
                share(whole),
                share(bogus)
            ));
            if leaf < 100 {
                errs.push(format!("{lib:?}: only {leaf} samples with its leaf"));
            }
            if share(under) < WHOLE_PCT {
                errs.push(format!(
                    "{lib:?}: {:.1}% of its leaf samples under {} (want ≥{WHOLE_PCT}%)",
                    share(under),
                    lib.caller()
                ));
            }
            if share(whole) < WHOLE_PCT {
                errs.push(format!(
                    "{lib:?}: {:.1}% of its leaf samples have the whole stack: native frames \
                     <- {} <- … <- the process's entry (want ≥{WHOLE_PCT}%)",
                    share(whole),
                    lib.caller()
                ));
            }
            if bogus > 0 {
                errs.push(format!("{lib:?}: {bogus} samples with bogus frames"));
            }
        }
        eprintln!(
            "{} {line}\n      numpy {} zlib {}",
            if errs.is_empty() { "PASS" } else { "FAIL" },
            truth["numpy"],
            truth["zlib"]
        );
        if !errs.is_empty() {
            for (lib, f) in &figs {
                for (what, stacks) in [("not whole", &f.not_whole), ("bogus", &f.bogus_stacks)] {
                    let mut top: Vec<(&String, &u64)> = stacks.iter().collect();
                    top.sort_by(|a, b| b.1.cmp(a.1));
                    for (st, n) in top.iter().take(3) {
                        eprintln!("      {lib:?} {what} {n}: {st}");
                    }
                }
            }
            eprintln!("      {errs:#?}");
            failures.push(interp.name.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "native libraries under Python failed for {failures:?}"
    );
}
