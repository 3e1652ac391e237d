//! Finding CPython in a process (which file holds the interpreter, version, load bias,
//! `_PyRuntime`, offsets, the TSS key and the libc TSD layout), and the user-space reference
//! walker: the same frame walk as the eBPF program, done with `process_vm_readv` only.

use std::io;

use kprof_common::python::{
    PY_LASTI_NONE, PYFRAME_CODE_UNREAD, PYFRAME_NOT_CODE, PYFRAME_RUN_END, PyFrame, PyProcConfig,
    layout as kind,
};

use super::elf::ElfInfo;
use super::layout::{self, Layout, PyVersion};
use super::procmem::{ProcMem, RemoteMemory as _};
use crate::proc::{
    files,
    maps::{MapEntry, read_maps},
};

/// Why a process could not be set up for Python walking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectError {
    /// No CPython in the process (no `_PyRuntime` in the executable or a `libpython`).
    NotPython,
    /// CPython found, but this version cannot be walked; native stacks only.
    Unsupported { version: String, reason: String },
    /// CPython found but not initialised yet (no interpreter / no TSS key): try again later.
    NotReady(String),
    /// The process went away or cannot be read.
    Io(String),
}

impl std::fmt::Display for DetectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DetectError::NotPython => write!(f, "not a CPython process"),
            DetectError::Unsupported { version, reason } => {
                write!(
                    f,
                    "python version not supported ({version}: {reason}): native frames only"
                )
            }
            DetectError::NotReady(why) => write!(f, "python not initialised yet: {why}"),
            DetectError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// glibc / musl `pthread_getspecific` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsdLayout {
    /// `Some(off)`: the descriptor is `*(fsbase + off)`; `None`: it is `fsbase`.
    pub self_off: Option<u32>,
    pub indirect: bool,
    pub base_off: u32,
    pub key_size: u32,
    pub val_off: u32,
    pub max_key: u32,
}

impl TsdLayout {
    /// glibc x86-64 (2.2x–2.4x): `THREAD_SELF->specific_1stblock[key].data`, keys < 32.
    pub const GLIBC: TsdLayout = TsdLayout {
        self_off: Some(0x10),
        indirect: false,
        base_off: 0x310,
        key_size: 16,
        val_off: 8,
        max_key: 32,
    };
}

/// A CPython process, set up for walking.
#[derive(Debug, Clone)]
pub struct PyProcess {
    pub pid: u32,
    pub mem: ProcMem,
    pub version: PyVersion,
    pub layout: Layout,
    /// ELF file holding the interpreter (the executable or `libpython3.X.so`).
    pub file: String,
    /// `true` when `file` is a shared libpython.
    pub shared: bool,
    pub bias: u64,
    pub runtime: u64,
    pub pycode_type: u64,
    pub tss_key: u32,
    pub tsd: TsdLayout,
    /// Address ranges of the eval loop (`_PyEval_EvalFrameDefault`, its `.cold` part).
    pub eval_ranges: Vec<(u64, u64)>,
    /// Executable mappings of the interpreter file.
    pub interp_ranges: Vec<(u64, u64)>,
    /// Notes from detection (offsets corrected from `tp_members`, …).
    pub notes: Vec<String>,
    /// The GIL's address ([`PyProcess::find_gil`]), once found.
    pub gil: Option<u64>,
    /// Where pymalloc's count of arenas is ([`PyProcess::python_heap`]): the address of
    /// `narenas_currently_allocated` (3.8–3.11) or of `obmalloc_state_main` (3.13+), from the
    /// file's local symbols; `None` when stripped (3.12 needs none).
    pub arena_symbol: Option<u64>,
}

/// `struct _obmalloc_state`: where `mgmt.narenas_currently_allocated` is (3.12–3.14), and
/// where the state is in `PyInterpreterState` on 3.12 (inline; a pointer to the static
/// `obmalloc_state_main` from 3.13). Measured with `offsetof` against each version's headers.
const OBMALLOC_NARENAS: u64 = 1064;
const INTERP_OBMALLOC_312: u64 = 3960;

fn io_err(e: io::Error) -> DetectError {
    DetectError::Io(e.to_string())
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// `Some((3, minor))` for `python3.11`, `libpython3.11.so.1.0`, `libpython3.6m.so`.
pub fn version_from_name(path: &str) -> Option<(u32, u32)> {
    let b = basename(path);
    let rest = b
        .strip_prefix("libpython")
        .or_else(|| b.strip_prefix("python"))?;
    let rest = rest.strip_prefix("3.")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((3, digits.parse().ok()?))
}

/// Whether the interpreter file is a free-threaded build (`python3.13t`, `libpython3.14t.so`):
/// it has no GIL.
pub fn free_threaded_name(path: &str) -> bool {
    let b = basename(path);
    let Some(rest) = b
        .strip_prefix("libpython3.")
        .or_else(|| b.strip_prefix("python3."))
    else {
        return false;
    };
    let after = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    after.len() < rest.len() && (after == "t" || after.starts_with("t.") || after.starts_with("td"))
}

/// Candidate files that may hold the interpreter, best first.
fn candidates(pid: u32, maps: &[MapEntry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |p: &str| {
        if !p.is_empty() && !p.starts_with('[') && !out.iter().any(|o| o == p) {
            out.push(p.to_string());
        }
    };
    for m in maps {
        if basename(&m.path).starts_with("libpython") {
            push(&m.path);
        }
    }
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        push(&exe);
    }
    for m in maps {
        if m.is_exec() && basename(&m.path).contains("python") {
            push(&m.path);
        }
    }
    out
}

impl PyProcess {
    /// Detect CPython in `pid` and compute everything the walkers need. Never stops the
    /// target: only `/proc` and `process_vm_readv`.
    pub fn detect(pid: u32) -> Result<Self, DetectError> {
        let maps = read_maps(pid).map_err(io_err)?;
        let mem = ProcMem::new(pid);
        // An interpreter whose file the dynamic loader is still mapping (segment by segment).
        let mut loading = None;
        // A candidate whose file took too long to read (a loaded node, a slow file system):
        // unknown yet, not "not Python".
        let mut slow = None;
        for path in candidates(pid, &maps) {
            // Only the file the process mapped: not what a tenant put at its path since.
            let Some(mapped) = maps.iter().find(|m| m.path == path) else {
                continue;
            };
            let read = {
                let (mapped, path) = (mapped.clone(), path.clone());
                // A tenant's file system may hang: never wait for it here.
                files::within(files::READ_TIME_LIMIT, move || {
                    let file = files::open_mapped(pid, &mapped).map_err(|e| e.to_string())?;
                    ElfInfo::open_cached(file, &path)
                })
            };
            let elf = match read {
                Ok(Ok(elf)) => elf,
                Ok(Err(_)) => continue,
                Err(timed_out) => {
                    slow.get_or_insert(format!("{}: {timed_out}", basename(&path)));
                    continue;
                }
            };
            let Some(rt_sym) = elf.symbol("_PyRuntime") else {
                continue;
            };
            let file_maps: Vec<&MapEntry> = maps.iter().filter(|m| m.path == path).collect();
            let Some(bias) = elf.load_bias(&file_maps) else {
                loading.get_or_insert(path);
                continue;
            };
            return Self::from_elf(pid, mem, &maps, path, &elf, bias, bias.wrapping_add(rt_sym));
        }
        if let Some(path) = loading {
            // Seen mid-`exec`: not a verdict (taking it for one left processes without Python
            // frames, at random, for their first second or for ever).
            return Err(DetectError::NotReady(format!(
                "{} is still being mapped",
                basename(&path)
            )));
        }
        if let Some(why) = slow {
            return Err(DetectError::NotReady(why));
        }
        // A CPython without `_PyRuntime` (2.x, ≤ 3.6) is still reported, not silently dropped.
        for m in &maps {
            let b = basename(&m.path);
            if let Some(rest) = b
                .strip_prefix("libpython")
                .or_else(|| b.strip_prefix("python"))
            {
                let ver: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let ver = ver.trim_end_matches('.');
                let old = ver.starts_with('2')
                    || ver
                        .strip_prefix("3.")
                        .and_then(|m| m.split('.').next()?.parse::<u32>().ok())
                        .is_some_and(|minor| minor < 7);
                if old {
                    return Err(DetectError::Unsupported {
                        version: ver.to_string(),
                        reason: "no _PyRuntime (CPython older than 3.7)".into(),
                    });
                }
            }
        }
        Err(DetectError::NotPython)
    }

    fn from_elf(
        pid: u32,
        mem: ProcMem,
        maps: &[MapEntry],
        path: String,
        elf: &ElfInfo,
        bias: u64,
        runtime: u64,
    ) -> Result<Self, DetectError> {
        let mut notes = Vec::new();
        // Version and layout.
        let head = mem.read_vec(runtime, 1024).map_err(io_err)?;
        let (version, mut layout) = if &head[..8] == layout::DEBUG_COOKIE {
            let (hex, l) =
                layout::from_debug_offsets(&head).map_err(|reason| DetectError::Unsupported {
                    version: PyVersion::from_hex(u64::from_le_bytes(
                        head[8..16].try_into().unwrap(),
                    ))
                    .to_string(),
                    reason,
                })?;
            (PyVersion::from_hex(hex), l)
        } else {
            let v = if let Some(a) = elf.symbol("Py_Version") {
                PyVersion::from_hex(mem.read_u32(bias.wrapping_add(a)).map_err(io_err)? as u64)
            } else {
                let (maj, min) = version_from_name(&path)
                    .or_else(|| {
                        (8..=12).find_map(|m| elf.find_version_string(3, m).map(|_| (3, m)))
                    })
                    .ok_or(DetectError::Unsupported {
                        version: "cpython ?".into(),
                        reason: "cannot determine the version".into(),
                    })?;
                // The patch level is informational: `Py_GetVersion`'s static buffer (filled at
                // start-up; a local `.symtab` symbol of unstripped builds), else a `.rodata`
                // string, else 0.
                let from_buf = ["version.0", "version"].iter().find_map(|n| {
                    let (a, size) = elf.symbol_with_size(n)?;
                    (size == 250).then_some(())?;
                    mem.read_cstr(bias.wrapping_add(a), 32).ok()
                });
                let patch = from_buf
                    .filter(|s| s.starts_with(&format!("{maj}.{min}.")))
                    .or_else(|| elf.find_version_string(maj, min))
                    .and_then(|s| {
                        s.split('.').nth(2).map(|p| {
                            p.chars()
                                .take_while(|c| c.is_ascii_digit())
                                .collect::<String>()
                        })
                    })
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                PyVersion {
                    major: maj,
                    minor: min,
                    patch,
                }
            };
            let l = layout::table(v.minor)
                .filter(|_| v.major == 3)
                .ok_or_else(|| DetectError::Unsupported {
                    version: v.to_string(),
                    reason: if v.at_least(3, 13) {
                        "no _Py_DebugOffsets found".into()
                    } else {
                        "older than 3.8".into()
                    },
                })?;
            (v, l)
        };

        // Code-object offsets as the interpreter publishes them.
        let pycode_type = elf
            .symbol("PyCode_Type")
            .map(|a| bias.wrapping_add(a))
            .unwrap_or(0);
        if pycode_type != 0
            && let Err(e) = cross_check_code_members(&mem, pycode_type, &mut layout, &mut notes)
        {
            notes.push(format!("PyCode_Type.tp_members unreadable: {e}"));
        }

        // Eval loop and interpreter ranges (for merging with native stacks).
        let mut eval_ranges = Vec::new();
        for name in [
            "_PyEval_EvalFrameDefault",
            "_PyEval_EvalFrameDefault.cold",
            "PyEval_EvalFrameEx",
        ] {
            if let Some((a, s)) = elf.symbol_with_size(name) {
                let start = bias.wrapping_add(a);
                eval_ranges.push((start, start + s.max(1)));
            }
        }
        let interp_ranges = maps
            .iter()
            .filter(|m| m.path == path && m.is_exec())
            .map(|m| (m.start, m.end))
            .collect();

        let shared = basename(&path).starts_with("libpython");
        let tsd = if maps
            .iter()
            .any(|m| basename(&m.path).starts_with("ld-musl"))
        {
            notes.push("musl libc: thread-state lookup not supported; using the thread list in user space only".into());
            TsdLayout {
                max_key: 0,
                ..TsdLayout::GLIBC
            }
        } else {
            TsdLayout::GLIBC
        };
        let mut p = PyProcess {
            pid,
            mem,
            version,
            layout,
            file: path,
            shared,
            bias,
            runtime,
            pycode_type,
            tss_key: u32::MAX,
            tsd,
            eval_ranges,
            interp_ranges,
            notes,
            gil: None,
            arena_symbol: None,
        };
        p.arena_symbol = elf
            .symbol(if version.at_least(3, 13) {
                "obmalloc_state_main"
            } else {
                "narenas_currently_allocated"
            })
            .map(|a| bias.wrapping_add(a));
        p.init_tss()?;
        p.gil = p.find_gil();
        Ok(p)
    }

    /// Read and validate the TSS key and the TSD layout against the thread list: for a thread
    /// state `ts`, `pthread_getspecific(key)` evaluated on `ts->thread_id` (= the thread's
    /// `fsbase` on glibc x86-64) must give back `ts`.
    fn init_tss(&mut self) -> Result<(), DetectError> {
        let tstates = self.thread_states().map_err(io_err)?;
        if tstates.is_empty() {
            return Err(DetectError::NotReady(
                "no interpreter or no thread state".into(),
            ));
        }
        let mut offsets: Vec<u64> = Vec::new();
        if let Some(o) = self.layout.rt_autotss {
            offsets.push(o);
        }
        let try_offset = |this: &mut Self, off: u64| -> Option<(u32, TsdLayout)> {
            let init = this.mem.read_i32(this.runtime + off).ok()?;
            let key = this.mem.read_u32(this.runtime + off + 4).ok()?;
            if init != 1 || key >= 1024 {
                return None;
            }
            this.validate_tsd(key, &tstates).map(|t| (key, t))
        };
        let mut found = None;
        for &off in &offsets {
            if let Some(r) = try_offset(self, off) {
                found = Some(r);
                break;
            }
        }
        if found.is_none() {
            // Search `_PyRuntime` for a `Py_tss_t {1, key}` that validates.
            for off in (0..8192u64).step_by(4) {
                if Some(off) == self.layout.rt_autotss {
                    continue;
                }
                if let Some(r) = try_offset(self, off) {
                    self.notes.push(format!(
                        "autoTSSkey found at _PyRuntime+{off} (table said {:?})",
                        self.layout.rt_autotss
                    ));
                    self.layout.rt_autotss = Some(off);
                    found = Some(r);
                    break;
                }
            }
        }
        match found {
            Some((key, tsd)) => {
                self.tss_key = key;
                self.tsd = tsd;
                Ok(())
            }
            None => Err(DetectError::NotReady(
                "gilstate TSS key not found or not initialised".into(),
            )),
        }
    }

    /// The TSD layout under which `key` maps at least one thread to its own thread state.
    fn validate_tsd(&self, key: u32, tstates: &[u64]) -> Option<TsdLayout> {
        let mut layout = self.tsd;
        if key >= layout.max_key {
            return None;
        }
        for &ts in tstates {
            let Ok(fsbase) = self.mem.read_u64(ts + self.layout.ts_thread_id) else {
                continue;
            };
            if fsbase == 0 {
                continue;
            }
            if self.tss_lookup_with(fsbase, key, &layout) == Some(ts) {
                return Some(layout);
            }
            // Unknown glibc: find the slot holding `ts` in the thread descriptor and derive
            // the array offset (16-byte slots, value at +8).
            if layout.self_off.is_some()
                && !layout.indirect
                && let Ok(desc) = self.mem.read_vec(fsbase, 0x1000)
            {
                for w in (0..desc.len() - 8).step_by(8) {
                    if u64::from_le_bytes(desc[w..w + 8].try_into().unwrap()) == ts {
                        let base = w as i64 - key as i64 * 16 - 8;
                        if base > 0 {
                            layout.base_off = base as u32;
                            if self.tss_lookup_with(fsbase, key, &layout) == Some(ts) {
                                return Some(layout);
                            }
                        }
                    }
                }
            }
        }
        None
    }

    fn tss_lookup_with(&self, fsbase: u64, key: u32, t: &TsdLayout) -> Option<u64> {
        let desc = match t.self_off {
            Some(o) => self.mem.read_u64(fsbase.wrapping_add(o as u64)).ok()?,
            None => fsbase,
        };
        let array = if t.indirect {
            self.mem
                .read_u64(desc.wrapping_add(t.base_off as u64))
                .ok()?
        } else {
            desc.wrapping_add(t.base_off as u64)
        };
        let v = self
            .mem
            .read_u64(
                array.wrapping_add(u64::from(key) * u64::from(t.key_size) + u64::from(t.val_off)),
            )
            .ok()?;
        (v != 0).then_some(v)
    }

    /// `pthread_getspecific(tss_key)` of the thread whose `fsbase` is given — what the eBPF
    /// program computes for the sampled thread.
    pub fn tss_thread_state(&self, fsbase: u64) -> Option<u64> {
        self.tss_lookup_with(fsbase, self.tss_key, &self.tsd)
    }

    /// Bytes of pymalloc's arenas now (the Python object heap: objects of up to 512 bytes;
    /// larger ones come from `malloc`): arenas × 256 KiB (3.8–3.9) or 1 MiB (3.10+). An error
    /// says why it cannot be read (a stripped build without the counter's symbol, a
    /// free-threaded build, which uses mimalloc).
    pub fn python_heap(&self) -> Result<u64, String> {
        if free_threaded_name(&self.file) {
            return Err("a free-threaded build (mimalloc, no pymalloc arenas)".into());
        }
        let minor = self.version.minor;
        let counter = match minor {
            ..=11 => self.arena_symbol,
            12 => self
                .interpreter()
                .ok()
                .map(|i| i + INTERP_OBMALLOC_312 + OBMALLOC_NARENAS),
            _ => self.arena_symbol.map(|s| s + OBMALLOC_NARENAS),
        }
        .ok_or_else(|| {
            format!(
                "{} has no symbol for pymalloc's arena count",
                basename(&self.file)
            )
        })?;
        let arenas = self.mem.read_u64(counter).map_err(|e| e.to_string())?;
        // A count no heap could have: the wrong place.
        if arenas > 1 << 22 {
            return Err(format!("an implausible arena count ({arenas})"));
        }
        let arena_bytes: u64 = if minor <= 9 { 256 << 10 } else { 1 << 20 };
        Ok(arenas * arena_bytes)
    }

    /// The main interpreter (`_PyRuntime.interpreters.head`).
    pub fn interpreter(&self) -> io::Result<u64> {
        self.mem
            .read_u64(self.runtime + self.layout.rt_interpreters_head)
    }

    /// The GIL of the main interpreter: the address of its `struct _gil_runtime_state`
    /// (`_PyRuntime.ceval.gil` on 3.8–3.11, `*interp->ceval.gil` on 3.12+), found by its
    /// contents since its offset changes with every version and build: `interval` (the switch
    /// interval in µs, 5000 unless `sys.setswitchinterval` changed it), `last_holder` (a thread
    /// state of the interpreter, or NULL) and `locked` (0 or 1). A futex word inside it is a
    /// thread waiting for the GIL (`cond`, `mutex`, `switch_cond`, `switch_mutex`). `None`:
    /// not found (a free-threaded build has no GIL to wait for).
    pub fn find_gil(&self) -> Option<u64> {
        const SCAN: usize = 4096;
        if free_threaded_name(&self.file) {
            return None;
        }
        let tstates = self.thread_states().ok()?;
        let plausible = |b: &[u8]| -> bool {
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
            let (interval, holder) = (u64_at(0), u64_at(8));
            let locked = i32::from_le_bytes(b[16..20].try_into().unwrap());
            let switches = u64_at(24);
            let holder_ok = holder == 0 || tstates.contains(&holder);
            (0..=1).contains(&locked)
                && switches < 1 << 48
                && holder_ok
                // The default interval, or any interval with a known holder.
                && (interval == 5000 || (interval > 0 && interval < 1 << 32 && holder != 0))
        };
        if !self.version.at_least(3, 12) {
            let buf = self.mem.read_vec(self.runtime, SCAN).ok()?;
            return (0..SCAN - 32)
                .step_by(8)
                .find(|&o| plausible(&buf[o..o + 32]))
                .map(|o| self.runtime + o as u64);
        }
        let interp = self.interpreter().ok().filter(|&i| i != 0)?;
        let buf = self.mem.read_vec(interp, SCAN).ok()?;
        buf.chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .filter(|&p| p > 0x10000 && p % 8 == 0)
            .find(|&p| self.mem.read_vec(p, 32).is_ok_and(|b| plausible(&b)))
    }

    /// Every thread state of the main interpreter (bounded).
    pub fn thread_states(&self) -> io::Result<Vec<u64>> {
        let interp = self.interpreter()?;
        let mut out = Vec::new();
        if interp == 0 {
            return Ok(out);
        }
        let mut ts = self
            .mem
            .read_u64(interp + self.layout.interp_threads_head)?;
        while ts != 0 && out.len() < 4096 && !out.contains(&ts) {
            out.push(ts);
            ts = self.mem.read_u64(ts + self.layout.ts_next)?;
        }
        Ok(out)
    }

    /// The innermost frame of a thread state (0: no Python code running).
    pub fn top_frame(&self, tstate: u64) -> io::Result<u64> {
        let first = self.mem.read_u64(tstate + self.layout.ts_frame)?;
        match self.layout.frame_kind {
            kind::CFRAME_IS_ENTRY | kind::CFRAME_OWNER if first != 0 => {
                self.mem.read_u64(first + self.layout.cframe_current_frame)
            }
            kind::CFRAME_IS_ENTRY | kind::CFRAME_OWNER => Ok(0),
            _ => Ok(first),
        }
    }

    /// Walk the frame chain from `frame`, innermost first: the same records and flags as the
    /// eBPF walker produces (`agent/ebpf/src/python.rs`).
    pub fn walk_frames(&self, mut frame: u64, max: usize) -> (Vec<PyFrame>, bool) {
        let l = &self.layout;
        let mut out: Vec<PyFrame> = Vec::new();
        let mut iterations = 0;
        while frame != 0 {
            iterations += 1;
            if out.len() >= max || iterations > max + 32 {
                return (out, true);
            }
            let Ok(back) = self.mem.read_u64(frame.wrapping_add(l.frame_back)) else {
                break;
            };
            let Ok(raw) = self.mem.read_u64(frame.wrapping_add(l.frame_code)) else {
                break;
            };
            let code = raw & l.code_mask;
            let mut flags = 0;
            let mut shim = false;
            match l.frame_kind {
                kind::FRAME_OBJECT => flags |= PYFRAME_RUN_END,
                kind::CFRAME_IS_ENTRY => {
                    if let Some(o) = l.frame_owner
                        && self.mem.read_u8(frame.wrapping_add(o)).unwrap_or(0) != 0
                    {
                        flags |= PYFRAME_RUN_END;
                    }
                }
                _ => {
                    if let Some(o) = l.frame_owner {
                        shim = self
                            .mem
                            .read_u8(frame + o)
                            .map(|b| b as u32 == l.shim_owner)
                            .unwrap_or(false);
                    }
                }
            }
            if shim || code == 0 {
                if let Some(prev) = out.last_mut() {
                    prev.flags |= PYFRAME_RUN_END;
                }
                frame = back;
                continue;
            }
            let lasti = if l.frame_kind == kind::FRAME_OBJECT {
                let v = self
                    .mem
                    .read_i32(frame.wrapping_add(l.frame_lasti))
                    .unwrap_or(-1);
                if v < 0 { PY_LASTI_NONE } else { v as u32 }
            } else {
                let ip = self
                    .mem
                    .read_u64(frame.wrapping_add(l.frame_lasti))
                    .unwrap_or(0);
                let base = code.wrapping_add(l.co_code_adaptive.unwrap_or(0));
                if ip < base || ip - base > u32::MAX as u64 {
                    PY_LASTI_NONE
                } else {
                    ((ip - base) / 2) as u32
                }
            };
            if self.pycode_type != 0 {
                match self.mem.read_u64(code.wrapping_add(8)) {
                    Ok(t) if t == self.pycode_type => {}
                    Ok(_) => flags |= PYFRAME_NOT_CODE,
                    Err(_) => flags |= PYFRAME_CODE_UNREAD,
                }
            }
            out.push(PyFrame { code, lasti, flags });
            frame = back;
        }
        if let Some(last) = out.last_mut() {
            last.flags |= PYFRAME_RUN_END;
        }
        (out, false)
    }

    /// The per-process configuration of the eBPF walker.
    pub fn proc_config(&self) -> PyProcConfig {
        let l = &self.layout;
        PyProcConfig {
            version: (self.version.major << 8) | self.version.minor,
            layout: l.frame_kind,
            tss_key: self.tss_key,
            tsd_self_off: self.tsd.self_off.unwrap_or(u32::MAX),
            tsd_indirect: self.tsd.indirect as u32,
            tsd_base_off: self.tsd.base_off,
            tsd_key_size: self.tsd.key_size,
            tsd_val_off: self.tsd.val_off,
            tsd_max_key: self.tsd.max_key,
            tstate_frame_off: l.ts_frame as u32,
            cframe_frame_off: l.cframe_current_frame as u32,
            frame_back_off: l.frame_back as u32,
            frame_code_off: l.frame_code as u32,
            frame_lasti_off: l.frame_lasti as u32,
            frame_owner_off: l.frame_owner.map(|o| o as u32).unwrap_or(u32::MAX),
            shim_owner: l.shim_owner,
            code_adaptive_off: l.co_code_adaptive.unwrap_or(0) as u32,
            _pad: 0,
            pycode_type: self.pycode_type,
            code_mask: l.code_mask,
            gil: self.gil.unwrap_or(0),
        }
    }

    /// The same interpreter in a child forked from this process (no `exec`): identical
    /// layout, addresses and TSS key. `None` when the child runs another executable or maps the
    /// interpreter elsewhere.
    pub fn forked_child(&self, child: u32) -> Option<PyProcess> {
        let exe = |p: u32| std::fs::read_link(format!("/proc/{p}/exe")).ok();
        if exe(child)? != exe(self.pid)? {
            return None;
        }
        let maps = read_maps(child).ok()?;
        let start = maps
            .iter()
            .filter(|m| m.path == self.file)
            .map(|m| m.start)
            .min()?;
        let mine = self.interp_ranges.iter().map(|r| r.0).min()?;
        let parent_maps = read_maps(self.pid).ok()?;
        let parent_start = parent_maps
            .iter()
            .filter(|m| m.path == self.file)
            .map(|m| m.start)
            .min()?;
        if start != parent_start || mine < start {
            return None;
        }
        let mut p = self.clone();
        p.pid = child;
        p.mem = ProcMem::new(child);
        Some(p)
    }

    /// Whether `addr` lies in the interpreter's eval loop.
    pub fn in_eval(&self, addr: u64) -> bool {
        self.eval_ranges.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// Whether `addr` lies in the interpreter's executable mappings.
    pub fn in_interpreter(&self, addr: u64) -> bool {
        self.interp_ranges
            .iter()
            .any(|&(s, e)| addr >= s && addr < e)
    }
}

/// One thread of the reference walker.
#[derive(Debug, Clone)]
pub struct ThreadStack {
    pub tstate: u64,
    /// `pthread_self()` of the thread (its `fsbase` on glibc x86-64).
    pub thread_id: u64,
    /// Kernel thread id (3.11+).
    pub native_tid: Option<u32>,
    pub frames: Vec<PyFrame>,
    pub truncated: bool,
}

impl PyProcess {
    /// Reference walker: every thread's Python frames (innermost first).
    pub fn walk_all_threads(&self, max_frames: usize) -> io::Result<Vec<ThreadStack>> {
        let mut out = Vec::new();
        for ts in self.thread_states()? {
            let thread_id = self
                .mem
                .read_u64(ts + self.layout.ts_thread_id)
                .unwrap_or(0);
            let native_tid = self
                .layout
                .ts_native_thread_id
                .and_then(|o| self.mem.read_u64(ts + o).ok())
                .map(|v| v as u32);
            let top = self.top_frame(ts).unwrap_or(0);
            let (frames, truncated) = self.walk_frames(top, max_frames);
            out.push(ThreadStack {
                tstate: ts,
                thread_id,
                native_tid,
                frames,
                truncated,
            });
        }
        Ok(out)
    }
}

/// Read `PyCode_Type.tp_members` / `tp_basicsize` from the target and correct the code-object
/// offsets of `layout` when they differ (the interpreter is the authority).
fn cross_check_code_members(
    mem: &ProcMem,
    pycode_type: u64,
    layout: &mut Layout,
    notes: &mut Vec<String>,
) -> io::Result<()> {
    const TP_BASICSIZE: u64 = 32;
    const TP_MEMBERS: u64 = 240;
    let members = mem.read_u64(pycode_type + TP_MEMBERS)?;
    if members == 0 {
        return Ok(());
    }
    for i in 0..64u64 {
        let m = members + i * 40; // PyMemberDef {name, type, offset, flags, doc}
        let name_ptr = mem.read_u64(m)?;
        if name_ptr == 0 {
            break;
        }
        let name = mem.read_cstr(name_ptr, 64)?;
        let off = mem.read_u64(m + 16)?;
        let slot = match name.as_str() {
            "co_filename" => Some(&mut layout.co_filename),
            "co_name" => Some(&mut layout.co_name),
            "co_firstlineno" => Some(&mut layout.co_firstlineno),
            "co_lnotab" if layout.line_table == layout::LineTableKind::Lnotab => {
                Some(&mut layout.co_linetable)
            }
            "co_linetable" if layout.line_table != layout::LineTableKind::Lnotab => {
                Some(&mut layout.co_linetable)
            }
            _ => None,
        };
        if let Some(slot) = slot
            && *slot != off
        {
            notes.push(format!("{name}: table {} → tp_members {off}", *slot));
            *slot = off;
        }
        if name == "co_qualname" && layout.co_qualname != Some(off) {
            notes.push(format!(
                "co_qualname: table {:?} → tp_members {off}",
                layout.co_qualname
            ));
            layout.co_qualname = Some(off);
        }
    }
    if layout.co_code_adaptive.is_some() {
        let basic = mem.read_u64(pycode_type + TP_BASICSIZE)?;
        if layout.co_code_adaptive != Some(basic) {
            notes.push(format!(
                "co_code_adaptive: table {:?} → tp_basicsize {basic}",
                layout.co_code_adaptive
            ));
            layout.co_code_adaptive = Some(basic);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_threaded_builds_are_told_by_their_file_names() {
        assert!(free_threaded_name("/usr/bin/python3.13t"));
        assert!(free_threaded_name("/x/lib/libpython3.14t.so.1.0"));
        assert!(!free_threaded_name("/usr/bin/python3.13"));
        assert!(!free_threaded_name("/x/lib/libpython3.11.so.1.0"));
        assert!(!free_threaded_name("/usr/bin/pythontest"));
    }

    #[test]
    fn versions_from_file_names() {
        assert_eq!(version_from_name("/usr/bin/python3.11"), Some((3, 11)));
        assert_eq!(
            version_from_name("/x/lib/libpython3.8.so.1.0"),
            Some((3, 8))
        );
        assert_eq!(version_from_name("/x/lib/libpython3.6m.so"), Some((3, 6)));
        assert_eq!(version_from_name("/usr/bin/python"), None);
        assert_eq!(version_from_name("/usr/bin/bash"), None);
    }
}
