//! Python support: CPython frames walked in eBPF (`agent/ebpf/src/python.rs`), resolved here to
//! `module.function (file:line)` and spliced into the native stack.
//!
//! * [`PythonSupport::new`] writes the kernel configuration (the offset of
//!   `task_struct->thread.fsbase`, from BTF) into `PY_GLOBAL`.
//! * [`PythonSupport::detect`] detects CPython in a process (executable or
//!   `libpython3.X.so`), its version, `_PyRuntime`, the struct offsets (a table for 3.8–3.12,
//!   `_Py_DebugOffsets` for 3.13+, code-object offsets checked against `PyCode_Type.tp_members`),
//!   the gilstate TSS key and the libc TSD layout — validated against the live thread list — and
//!   registers the process in `PY_PROCS`. The target is never stopped (no ptrace attach).
//! * [`PythonSupport::symbolize`] resolves `(code object, lasti)` with `process_vm_readv`
//!   through an LRU cache keyed by `(pid, code)`.
//! * [`PythonSupport::merge`] splices the Python frames into the native stack.
//!
//! [`process::PyProcess`] also holds a user-space reference walker (same algorithm, no eBPF),
//! used by the tests and as a cross-check.

pub mod code;
pub mod elf;
pub mod layout;
pub mod linetable;
pub mod merge;
pub mod probes;
pub mod process;
pub mod procmem;
pub mod thread_info;
pub mod threads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kprof_common::python::{
    PYFRAME_NOT_CODE, PyFrame, PyFrames, PyGlobalConfig, PyProcConfig, names,
};

use crate::profile::frame::{Frame, FrameKind};
pub use code::CodeInfo;
pub use process::{DetectError, PyProcess};

/// Errors of the Python support set-up.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error("eBPF map {0} missing from the loaded object")]
    MissingMap(&'static str),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
}

/// What was found in a process, for the Profile object and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// e.g. `cpython 3.12.1`, `cpython 3.11.2 (libpython3.11.so.1.0)`.
    pub display: String,
    /// `true` when Python frames will be collected.
    pub python_frames: bool,
    /// Warnings for the user, e.g. "python version not supported: native frames only".
    pub warnings: Vec<String>,
}

/// Capacity of the code-object cache: entries, and bytes (a tenant's code objects may carry
/// line tables of up to 1 MiB each).
const CODE_CACHE_CAP: usize = 16384;
const CODE_CACHE_BYTES: usize = 64 << 20;

/// Small LRU keyed by `(pid, code address)`.
struct CodeCache {
    map: HashMap<(u32, u64), (CodeInfo, u64)>,
    tick: u64,
    bytes: usize,
}

impl CodeCache {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            tick: 0,
            bytes: 0,
        }
    }

    fn get_mut(&mut self, key: (u32, u64)) -> Option<&mut CodeInfo> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&key).map(|e| {
            e.1 = t;
            &mut e.0
        })
    }

    fn insert(&mut self, key: (u32, u64), v: CodeInfo) {
        let size = v.heap_bytes();
        while !self.map.is_empty()
            && (self.map.len() >= CODE_CACHE_CAP || self.bytes + size > CODE_CACHE_BYTES)
        {
            // Evict the least recently used quarter (at least one entry).
            let mut ticks: Vec<u64> = self.map.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 4];
            self.map.retain(|_, e| e.1 > cut);
            self.recount();
        }
        self.tick += 1;
        if let Some((old, _)) = self.map.insert(key, (v, self.tick)) {
            self.bytes -= old.heap_bytes();
        }
        self.bytes += size;
    }

    fn recount(&mut self) {
        self.bytes = self.map.values().map(|e| e.0.heap_bytes()).sum();
    }

    fn forget_pid(&mut self, pid: u32) {
        self.map.retain(|k, _| k.0 != pid);
        self.recount();
    }
}

type ProcMap = aya::maps::HashMap<aya::maps::MapData, u32, PyProcConfig>;

/// Size of `struct _gil_runtime_state` on x86-64 (interval, last_holder, locked,
/// switch_number, two condition variables and two mutexes).
pub const GIL_BYTES: u64 = 208;

/// State shared with the watcher thread.
#[derive(Default)]
struct Inner {
    procs: HashMap<u32, PyProcess>,
    /// Processes to look at again (not Python yet — e.g. a shell about to `exec` python — or
    /// an interpreter still initialising), with the time to give up.
    pending: HashMap<u32, Instant>,
    infos: HashMap<u32, RuntimeInfo>,
    /// `PY_PROCS`, taken out of the loaded object (absent in user-space-only mode).
    map: Option<ProcMap>,
    /// When the GIL of a process whose GIL is not known yet was last looked for.
    gil_tried: HashMap<u32, Instant>,
    watcher_running: bool,
}

impl Inner {
    fn register(&mut self, pid: u32) -> Result<(), PythonError> {
        let Some(map) = self.map.as_mut() else {
            return Ok(());
        };
        let cfg = self
            .procs
            .get(&pid)
            .map(PyProcess::proc_config)
            .ok_or(PythonError::MissingMap("process"))?;
        map.insert(pid, cfg, 0)
            .map_err(|e| PythonError::Map(names::MAP_PY_PROCS, e.to_string()))
    }

    /// `pid` was found to be CPython: walk it in kernel from now on, and adopt the children it
    /// forked before (multiprocessing pools start at once, often before the parent's first
    /// look; the kernel copies the walker entry only at forks made after it).
    fn ready(&mut self, pid: u32, p: PyProcess, mut info: RuntimeInfo) -> RuntimeInfo {
        self.pending.remove(&pid);
        self.procs.insert(pid, p);
        if info.python_frames
            && let Err(e) = self.register(pid)
        {
            info.python_frames = false;
            info.warnings
                .push(format!("python frames unavailable: {e}"));
        }
        self.infos.insert(pid, info.clone());
        if info.python_frames {
            self.adopt_children(pid);
        }
        info
    }

    /// Register the forked children of `parent` not known yet: they share its interpreter
    /// layout and TSS key (code objects are read from the child).
    fn adopt_children(&mut self, parent: u32) {
        for child in children_of(parent) {
            if self.procs.contains_key(&child) || self.pending.contains_key(&child) {
                continue;
            }
            let Some(p) = self.procs.get(&parent).and_then(|p| p.forked_child(child)) else {
                continue;
            };
            self.procs.insert(child, p);
            if self.register(child).is_ok()
                && let Some(info) = self.infos.get(&parent).cloned()
            {
                self.infos.insert(child, info);
            }
        }
    }
}

/// How long a process that is not (yet) Python is watched for an `exec` of CPython.
const WATCH_FOR: Duration = Duration::from_secs(10);
/// How often the watcher looks at pending processes.
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Forked children are looked for every this many ticks.
const CHILDREN_EVERY: u64 = 10;

/// Python support of the agent.
pub struct PythonSupport {
    inner: Arc<Mutex<Inner>>,
    cache: Mutex<CodeCache>,
    fsbase_off: u32,
    /// The last reading of each process's thread names (`thread_info.rs`).
    names: HashMap<u32, thread_info::NameReading>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Outcome of one detection attempt.
enum Attempt {
    Ready(Box<PyProcess>, RuntimeInfo),
    Final(Option<RuntimeInfo>),
    Retry(Option<RuntimeInfo>),
}

fn attempt(pid: u32) -> Attempt {
    // A process's files and memory are a tenant's: whatever they hold, a panic while reading
    // them costs that process its Python frames, not the agent its watcher.
    let detected = std::panic::catch_unwind(|| PyProcess::detect(pid)).unwrap_or_else(|_| {
        crate::metrics::error("panic");
        Err(DetectError::Unsupported {
            version: "?".into(),
            reason: "an internal error while reading the interpreter".into(),
        })
    });
    match detected {
        Ok(p) => {
            let mut warnings = p
                .notes
                .iter()
                .filter(|n| n.starts_with("musl"))
                .cloned()
                .collect::<Vec<_>>();
            let ok = p.tsd.max_key > 0;
            if process::free_threaded_name(&p.file) {
                warnings.push(
                    "free-threaded CPython: it has no GIL, so there are no GIL waits or GIL held % (lock waits are PyMutex parking)"
                        .into(),
                );
            } else if p.gil.is_none() {
                warnings.push(
                    "the GIL was not found when the interpreter was detected: until it is (looked for every 200 ms), GIL waits count as lock waits and GIL held % is missing (wall and lock profiles still work)"
                        .into(),
                );
            }
            if !ok {
                warnings.push(
                    "python thread-state lookup unsupported for this libc: native frames only"
                        .into(),
                );
            }
            let display = format!(
                "cpython {}{}",
                p.version,
                if p.shared {
                    format!(" ({})", p.file.rsplit('/').next().unwrap_or(&p.file))
                } else {
                    String::new()
                }
            );
            Attempt::Ready(
                Box::new(p),
                RuntimeInfo {
                    display,
                    python_frames: ok,
                    warnings,
                },
            )
        }
        Err(DetectError::NotPython) => Attempt::Retry(None),
        Err(DetectError::Unsupported { version, reason }) => Attempt::Final(Some(RuntimeInfo {
            display: format!("cpython {version}"),
            python_frames: false,
            warnings: vec![format!(
                "python version not supported ({reason}): native frames only"
            )],
        })),
        Err(DetectError::NotReady(why)) => Attempt::Retry(Some(RuntimeInfo {
            display: "cpython (initialising)".into(),
            python_frames: false,
            warnings: vec![format!("python interpreter not ready ({why}); will retry")],
        })),
        Err(DetectError::Io(_)) => Attempt::Final(None),
    }
}

impl PythonSupport {
    /// Write the kernel configuration of the walker into the loaded object (the offset of
    /// `task_struct->thread.fsbase` from BTF) and take the `PY_PROCS` map.
    pub fn new(bpf: &mut aya::Ebpf) -> Result<Self, PythonError> {
        let fsbase_off = crate::kernel::btf::task_offsets()
            .map_err(PythonError::Btf)?
            .fsbase;
        let map = bpf
            .map_mut(names::MAP_PY_GLOBAL)
            .ok_or(PythonError::MissingMap(names::MAP_PY_GLOBAL))?;
        let mut arr: aya::maps::Array<_, PyGlobalConfig> = aya::maps::Array::try_from(map)
            .map_err(|e| PythonError::Map(names::MAP_PY_GLOBAL, e.to_string()))?;
        arr.set(
            0,
            PyGlobalConfig {
                task_fsbase_off: fsbase_off,
                enabled: 1,
            },
            0,
        )
        .map_err(|e| PythonError::Map(names::MAP_PY_GLOBAL, e.to_string()))?;
        let map = bpf
            .take_map(names::MAP_PY_PROCS)
            .ok_or(PythonError::MissingMap(names::MAP_PY_PROCS))?;
        let map = ProcMap::try_from(map)
            .map_err(|e| PythonError::Map(names::MAP_PY_PROCS, e.to_string()))?;
        let s = Self::without_kernel(fsbase_off);
        lock(&s.inner).map = Some(map);
        Ok(s)
    }

    /// User-space only (no eBPF object): detection, the reference walker, symbolization and
    /// merging. Used by tests and tools.
    pub fn without_kernel(fsbase_off: u32) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            cache: Mutex::new(CodeCache::new()),
            fsbase_off,
            names: HashMap::new(),
        }
    }

    /// Offset of `task_struct->thread.fsbase` in use.
    pub fn fsbase_offset(&self) -> u32 {
        self.fsbase_off
    }

    /// Detect CPython in `pid` and register it for in-kernel walking, unless that was done
    /// already (looked at early, or adopted as a forked child).
    ///
    /// `None` when the process is not Python (it is still watched for a few seconds, in case it
    /// is about to `exec` CPython). An unsupported interpreter gives a `RuntimeInfo` with a
    /// warning (its native stacks still flow). An interpreter that is still starting is waited
    /// for up to `max_wait` here, then retried in the background.
    pub fn detect(&mut self, pid: u32, max_wait: Duration) -> Option<RuntimeInfo> {
        {
            let inner = lock(&self.inner);
            if inner.procs.contains_key(&pid) {
                return inner.infos.get(&pid).cloned();
            }
        }
        self.attach(pid, max_wait)
    }

    /// Detection and registration (in `PY_PROCS` when the map is present), waiting at most
    /// `max_wait` for an initialising interpreter.
    pub fn attach(&mut self, pid: u32, max_wait: Duration) -> Option<RuntimeInfo> {
        let start = Instant::now();
        let debug = std::env::var_os("KPROF_PY_DEBUG").is_some();
        loop {
            let a = attempt(pid);
            if debug {
                let what = match &a {
                    Attempt::Ready(_, i) => format!("ready {i:?}"),
                    Attempt::Final(i) => format!("final {i:?}"),
                    Attempt::Retry(i) => format!("retry {i:?}"),
                };
                eprintln!(
                    "kprof python: pid {pid} after {:?}: {what}",
                    start.elapsed()
                );
            }
            match a {
                Attempt::Ready(p, info) => {
                    let info = lock(&self.inner).ready(pid, *p, info);
                    self.ensure_watcher();
                    return Some(info);
                }
                Attempt::Final(info) => {
                    let mut inner = lock(&self.inner);
                    inner.pending.remove(&pid);
                    if let Some(i) = &info {
                        inner.infos.insert(pid, i.clone());
                    }
                    return info;
                }
                Attempt::Retry(info) => {
                    // Not Python (yet): a short look only; the watcher keeps trying.
                    let wait = if info.is_some() {
                        max_wait
                    } else {
                        max_wait.min(Duration::from_millis(200))
                    };
                    if start.elapsed() >= wait {
                        self.watch(pid);
                        return info;
                    }
                    // Short: a just-started interpreter runs user code some 30 ms after exec.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Keep trying `pid` in the background for a while.
    fn watch(&self, pid: u32) {
        lock(&self.inner)
            .pending
            .insert(pid, Instant::now() + WATCH_FOR);
        self.ensure_watcher();
    }

    /// Start the background thread (pending processes, forked children) unless it runs.
    fn ensure_watcher(&self) {
        let mut inner = lock(&self.inner);
        if inner.watcher_running {
            return;
        }
        inner.watcher_running = true;
        let shared = Arc::clone(&self.inner);
        std::thread::Builder::new()
            .name("kprof-py-watch".into())
            .spawn(move || watcher(shared))
            .ok();
    }

    /// What is known about `pid`'s runtime (also for processes detected later in the
    /// background).
    pub fn runtime(&self, pid: u32) -> Option<RuntimeInfo> {
        lock(&self.inner).infos.get(&pid).cloned()
    }

    /// A process `exec`ed: what was known of its interpreter no longer holds (the kernel
    /// already dropped its walker entry). It is looked at again, now (`attach`) or by the
    /// background watcher, which also notices a later `exec` of CPython.
    pub fn on_exec(&self, pid: u32) {
        self.forget(pid);
        self.watch(pid);
    }

    /// A process exited.
    pub fn on_exit(&mut self, pid: u32) {
        self.forget(pid);
        self.forget_names(pid);
    }

    /// Drop all that is known of `pid`: its interpreter, walker entry, pending look and cached
    /// code objects.
    fn forget(&self, pid: u32) {
        let mut inner = lock(&self.inner);
        inner.procs.remove(&pid);
        inner.gil_tried.remove(&pid);
        inner.pending.remove(&pid);
        inner.infos.remove(&pid);
        if let Some(m) = inner.map.as_mut() {
            let _ = m.remove(&pid);
        }
        drop(inner);
        lock(&self.cache).forget_pid(pid);
    }

    /// The bytes of `pid`'s GIL (`struct _gil_runtime_state`, the same 208 bytes in every
    /// CPython 3.8–3.14 with a GIL), once found (`PyProcess::find_gil`, at detection or by
    /// [`PythonSupport::find_missing_gils`]).
    pub fn gil(&self, pid: u32) -> Option<std::ops::Range<u64>> {
        let addr = lock(&self.inner).procs.get(&pid)?.gil?;
        Some(addr..addr + GIL_BYTES)
    }

    /// Looks again for the GIL of the interpreters whose GIL is not known (one may create it
    /// after it was detected), each at most every 200 ms; a GIL found is given to the walker,
    /// so CPU samples say who holds it from then on.
    pub fn find_missing_gils(&self) {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        let due: Vec<u32> = inner
            .procs
            .iter()
            .filter(|(pid, p)| {
                p.gil.is_none()
                    && inner
                        .gil_tried
                        .get(*pid)
                        .is_none_or(|at| now.duration_since(*at) >= Duration::from_millis(200))
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            inner.gil_tried.insert(pid, now);
            let Some(addr) = inner.procs.get(&pid).and_then(PyProcess::find_gil) else {
                continue;
            };
            if let Some(p) = inner.procs.get_mut(&pid) {
                p.gil = Some(addr);
            }
            if let Err(e) = inner.register(pid) {
                tracing::debug!(pid, error = %e, "cannot update the walker's GIL address");
            }
        }
    }

    /// The Python object heap of `pid` (pymalloc's arenas), see [`PyProcess::python_heap`]:
    /// `None` for a process without a detected interpreter.
    pub fn python_heap(&self, pid: u32) -> Option<Result<u64, String>> {
        lock(&self.inner)
            .procs
            .get(&pid)
            .map(PyProcess::python_heap)
    }

    /// Processes with a detected interpreter.
    pub fn process_count(&self) -> usize {
        lock(&self.inner).procs.len()
    }

    /// The detected interpreter of `pid`, if any (a copy).
    pub fn process(&self, pid: u32) -> Option<PyProcess> {
        lock(&self.inner).procs.get(&pid).cloned()
    }

    /// Resolve one captured frame to `module.qualname (file:line)`.
    pub fn symbolize(&mut self, pid: u32, frame: &PyFrame) -> Frame {
        self.resolve(pid, frame)
    }

    fn resolve(&self, pid: u32, frame: &PyFrame) -> Frame {
        let inner = lock(&self.inner);
        let Some(proc_) = inner.procs.get(&pid) else {
            return unknown_frame(frame.code);
        };
        if frame.flags & PYFRAME_NOT_CODE != 0 {
            return unknown_frame(frame.code);
        }
        let mut cache = lock(&self.cache);
        let key = (pid, frame.code);
        // Stacks are resolved once per distinct raw stack, so checking a cached entry costs a
        // read per frame of a new stack, not per sample: it catches a code object freed and
        // another allocated at its address, which would otherwise keep the old one's name.
        let stale = cache.get_mut(key).map(|info| {
            proc_
                .code_identity(frame.code)
                .is_ok_and(|now| now != info.identity)
        });
        if stale != Some(false) {
            match proc_.read_code(frame.code) {
                Ok(info) => cache.insert(key, info),
                Err(_) => return unknown_frame(frame.code),
            }
        }
        let Some(info) = cache.get_mut(key) else {
            return unknown_frame(frame.code);
        };
        let line = proc_.line_of(info, frame.lasti).unwrap_or(0);
        let mut f = Frame::python(info.display_name(), info.filename.as_str(), line);
        f.address = frame.code;
        f
    }

    /// Splice the Python frames of a sample into its native stack (both innermost first). See
    /// [`merge::merge_stacks`].
    pub fn merge(&self, pid: u32, native: Vec<Frame>, py: PyFrames<'_>) -> Vec<Frame> {
        if py.frames.is_empty() {
            return native;
        }
        let frames: Vec<(Frame, u32)> = py
            .frames
            .iter()
            .filter(|f| f.flags & PYFRAME_NOT_CODE == 0)
            .map(|f| (self.resolve(pid, f), f.flags))
            .collect();
        let interp = lock(&self.inner)
            .procs
            .get(&pid)
            .map(merge::InterpreterId::of);
        merge::merge_stacks(native, frames, py.truncated, interp.as_ref())
    }
}

fn unknown_frame(code: u64) -> Frame {
    let mut f = Frame::new(
        FrameKind::Python,
        Arc::<str>::from("<unknown python frame>"),
    );
    f.address = code;
    f
}

/// Background retries of pending processes; exits when none is left.
fn watcher(shared: Arc<Mutex<Inner>>) {
    let mut seen: HashMap<u32, Option<Signature>> = HashMap::new();
    let mut tick = 0u64;
    loop {
        // Not faster: each look at a pending process reads its maps, and forked children are
        // registered in kernel at fork (the scan below is the fallback).
        std::thread::sleep(WATCH_TICK);
        tick += 1;
        let (pids, parents): (Vec<u32>, Vec<u32>) = {
            let mut inner = lock(&shared);
            let now = Instant::now();
            inner
                .pending
                .retain(|pid, deadline| *deadline > now && crate::proc::is_alive(*pid));
            // Forget processes that exited (their map entries would go stale on pid reuse).
            let dead: Vec<u32> = inner
                .procs
                .keys()
                .copied()
                .filter(|p| !crate::proc::is_alive(*p))
                .collect();
            for pid in dead {
                inner.procs.remove(&pid);
                if let Some(m) = inner.map.as_mut() {
                    let _ = m.remove(&pid);
                }
            }
            let parents: Vec<u32> = inner.procs.keys().copied().collect();
            if inner.pending.is_empty() && parents.is_empty() {
                inner.watcher_running = false;
                return;
            }
            (inner.pending.keys().copied().collect(), parents)
        };
        // Forked children (multiprocessing workers, pre-fork servers) share their parent's
        // interpreter layout and TSS key. The kernel copies the parent's walker entry at fork;
        // this registers them in user space (code objects are read from the child) in case
        // their first sample is late, once a second.
        let parents = if tick.is_multiple_of(CHILDREN_EVERY) {
            parents
        } else {
            Vec::new()
        };
        for parent in parents {
            lock(&shared).adopt_children(parent);
        }
        for pid in pids {
            let sig = process_signature(pid);
            if sig.is_some() && seen.get(&pid) == Some(&sig) {
                continue;
            }
            seen.insert(pid, sig);
            match attempt(pid) {
                Attempt::Retry(Some(_)) => {
                    // Initialising: retry on the next tick whatever the signature.
                    seen.remove(&pid);
                }
                Attempt::Ready(p, info) => {
                    lock(&shared).ready(pid, *p, info);
                }
                Attempt::Final(info) => {
                    let mut inner = lock(&shared);
                    inner.pending.remove(&pid);
                    if let Some(i) = info {
                        inner.infos.insert(pid, i);
                    }
                }
                Attempt::Retry(None) => {
                    // Not Python yet: look again only when the process changes (exec, new
                    // mappings such as a dlopen'ed libpython).
                }
            }
        }
    }
}

/// Child processes of every thread of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in rd.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}

/// What changes when a process `exec`s or maps a new library: the executable's identity and
/// the number of mappings.
type Signature = ((u64, u64), usize);

fn process_signature(pid: u32) -> Option<Signature> {
    let exe = crate::proc::exe_identity(pid)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    Some((exe, maps.lines().count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(table_bytes: usize) -> CodeInfo {
        let mut c = CodeInfo::default();
        c.name = "f".into();
        c.table = vec![0; table_bytes];
        c
    }

    #[test]
    fn the_code_cache_is_bounded_by_bytes_and_keeps_what_was_used_last() {
        let mut c = CodeCache::new();
        // Line tables of 1 MiB, the most a code object may carry: far fewer fit than entries.
        for i in 0..200u64 {
            c.insert((1, i), code(1 << 20));
            // Entry 0 stays in use.
            assert!(
                c.get_mut((1, 0)).is_some(),
                "the entry in use was evicted at {i}"
            );
            assert!(c.bytes <= CODE_CACHE_BYTES, "{} bytes", c.bytes);
        }
        assert!(c.map.len() < 200);
        assert_eq!(
            c.bytes,
            c.map.values().map(|e| e.0.heap_bytes()).sum::<usize>()
        );
        // Replacing an entry does not count it twice; forgetting a process frees its bytes.
        c.insert((1, 0), code(10));
        assert_eq!(
            c.bytes,
            c.map.values().map(|e| e.0.heap_bytes()).sum::<usize>()
        );
        c.insert((2, 7), code(100));
        c.forget_pid(1);
        assert_eq!((c.map.len(), c.bytes), (1, code(100).heap_bytes()));
    }
}
