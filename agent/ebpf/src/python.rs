//! In-kernel CPython frame walker.
//!
//! For a sample of a registered Python process (`PY_PROCS[tgid]`), find the sampled thread's
//! `PyThreadState` through the interpreter's gilstate TSS key — an emulation of
//! `pthread_getspecific` on the thread's `fsbase`, read from `task_struct` at the offset user
//! space derived from BTF — so that a thread running with the GIL released (in `zlib.compress`,
//! a C extension, I/O) still shows its Python callers. Then follow the frame chain and record
//! `(code object, instruction offset, flags)` per frame. Names, files and line numbers are
//! resolved in user space (`agent/src/python`).
//!
//! Verifier notes: the frame loop is a `bpf_loop` (kernel ≥ 5.17) whose callback is verified
//! once — a plain bounded `for` over 160 frames exceeded the 1M-instruction verifier budget.
//! Each frame costs one fixed-size read of the frame header plus one 8-byte read of the code
//! object's type; offsets from the config are clamped before they index the header copy.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_loop,
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use kprof_common::python::{
    GIL_HELD, GIL_LAST_HOLDER_OFF, GIL_LOCKED_OFF, GIL_RELEASED, GIL_UNKNOWN, MAX_PY_FRAMES,
    MAX_PY_PROCS, PY_LASTI_NONE, PYFRAME_CODE_UNREAD, PYFRAME_NOT_CODE, PYFRAME_RUN_END,
    PyGlobalConfig, PyProcConfig, PyStack, PyStat, PyTestEvent, layout,
};

/// Per-process walker configuration, keyed by tgid (written by `PythonSupport::on_process`).
#[map(name = "PY_PROCS")]
pub static PY_PROCS: HashMap<u32, PyProcConfig> = HashMap::with_max_entries(MAX_PY_PROCS, 0);

/// Kernel offsets (single entry, written by `PythonSupport::new`).
#[map(name = "PY_GLOBAL")]
pub static PY_GLOBAL: Array<PyGlobalConfig> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `PyStat`.
#[map(name = "PY_STATS")]
pub static PY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PyStat::COUNT, 0);

/// Events of the stand-alone test program.
#[map(name = "PY_TEST_EVENTS")]
pub static PY_TEST_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Iteration budget of the frame loop: room for `MAX_PY_FRAMES` frames plus the shim / entry
/// frames (3.12+) that are skipped without taking a slot.
const MAX_ITERATIONS: usize = MAX_PY_FRAMES + 32;

/// Bytes of the frame header copied per frame: covers `f_back`, `f_code`, `f_lasti` of a ≤3.10
/// `PyFrameObject` (`f_lasti` at 104) and `previous`, `f_executable`, `instr_ptr`, `owner` of a
/// 3.11+ `_PyInterpreterFrame` (owner ≤ 74).
const OLD_HDR_WORDS: usize = 14; // 112 bytes; a PyFrameObject is ≥ 360 bytes
const NEW_HDR_WORDS: usize = 10; // 80 bytes; an _PyInterpreterFrame is ≥ 80 bytes

#[inline(always)]
fn bump(stat: PyStat, by: u64) {
    if let Some(p) = PY_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += by };
    }
}

#[inline(always)]
fn read_user_u64(addr: u64) -> Option<u64> {
    if addr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error, never a crash.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The `PyThreadState*` of the current thread: `pthread_getspecific(tss_key)` evaluated on the
/// thread's `fsbase`.
#[inline(always)]
fn current_thread_state(cfg: &PyProcConfig, g: &PyGlobalConfig) -> Option<u64> {
    // SAFETY: bpf_get_current_task is always valid in a perf_event program.
    let task = unsafe { bpf_get_current_task() };
    if task == 0 {
        return None;
    }
    let fsbase_ptr = (task + g.task_fsbase_off as u64) as *const u64;
    // SAFETY: a kernel read at a BTF-derived offset of the current task_struct.
    let fsbase = match unsafe { bpf_probe_read_kernel(fsbase_ptr) } {
        Ok(v) if v != 0 => v,
        _ => {
            bump(PyStat::TsdReadErr, 1);
            return None;
        }
    };
    let desc = if cfg.tsd_self_off != u32::MAX {
        match read_user_u64(fsbase + cfg.tsd_self_off as u64) {
            Some(v) => v,
            None => {
                bump(PyStat::TsdReadErr, 1);
                return None;
            }
        }
    } else {
        fsbase
    };
    if cfg.tss_key >= cfg.tsd_max_key {
        return None;
    }
    let array = if cfg.tsd_indirect != 0 {
        match read_user_u64(desc + cfg.tsd_base_off as u64) {
            Some(v) => v,
            None => {
                bump(PyStat::TsdReadErr, 1);
                return None;
            }
        }
    } else {
        desc + cfg.tsd_base_off as u64
    };
    let slot = array + cfg.tss_key as u64 * cfg.tsd_key_size as u64 + cfg.tsd_val_off as u64;
    match read_user_u64(slot) {
        Some(v) if v != 0 => Some(v),
        Some(_) => {
            bump(PyStat::NoThreadState, 1);
            None
        }
        None => {
            bump(PyStat::TsdReadErr, 1);
            None
        }
    }
}

/// The innermost frame of a thread state (0 when the thread runs no Python code).
#[inline(always)]
fn top_frame(cfg: &PyProcConfig, tstate: u64) -> u64 {
    let first = read_user_u64(tstate + cfg.tstate_frame_off as u64).unwrap_or(0);
    match cfg.layout {
        layout::CFRAME_IS_ENTRY | layout::CFRAME_OWNER => {
            if first == 0 {
                0
            } else {
                read_user_u64(first + cfg.cframe_frame_off as u64).unwrap_or(0)
            }
        }
        _ => first,
    }
}

/// Word `off / 8` of a header copy, shifted so that byte `off` is the lowest byte.
#[inline(always)]
fn hdr_field<const N: usize>(hdr: &[u64; N], off: u32) -> u64 {
    let idx = (off / 8) as usize;
    if idx >= N {
        return 0;
    }
    let shift = (off % 8) * 8;
    hdr[idx] >> shift
}

/// Copy the frame header at `frame` into `hdr` (one read).
#[inline(always)]
fn read_hdr<const N: usize>(frame: u64) -> Option<[u64; N]> {
    // SAFETY: user memory read checked by the helper.
    unsafe { bpf_probe_read_user(frame as *const [u64; N]) }.ok()
}

/// State of the frame walk, shared with the `bpf_loop` callback through the stack.
#[repr(C)]
struct Walk {
    cfg: *const PyProcConfig,
    py: *mut PyStack,
    frame: u64,
    n: u64,
}

/// One step of the walk: read one frame header, record one frame (or skip a shim).
/// Returns 1 to stop the loop.
#[inline(always)]
fn step<const N: usize>(w: &mut Walk) -> i64 {
    // SAFETY: `cfg` is a map value and `py` the caller's stack buffer; both outlive the loop.
    let (cfg, py) = unsafe { (&*w.cfg, &mut *w.py) };
    let frame = w.frame;
    if frame == 0 {
        return 1;
    }
    let n = w.n as usize;
    if n >= MAX_PY_FRAMES {
        py.truncated = 1;
        return 1;
    }
    let hdr: [u64; N] = match read_hdr::<N>(frame) {
        Some(h) => h,
        None => {
            bump(PyStat::FrameReadErr, 1);
            w.frame = 0;
            return 1;
        }
    };
    let back = hdr_field(&hdr, cfg.frame_back_off);
    let code = hdr_field(&hdr, cfg.frame_code_off) & cfg.code_mask;
    w.frame = back;

    let owner = (hdr_field(&hdr, cfg.frame_owner_off) & 0xff) as u32;
    let mut flags = 0u32;
    let shim = match cfg.layout {
        layout::FRAME_OBJECT => {
            flags = PYFRAME_RUN_END;
            false
        }
        layout::CFRAME_IS_ENTRY => {
            if owner != 0 {
                flags = PYFRAME_RUN_END;
            }
            false
        }
        _ => owner == cfg.shim_owner,
    };
    if shim || code == 0 {
        // An interpreter entry frame: the run of frames collected so far ends here.
        if n > 0 {
            if let Some(prev) = py.frames.get_mut(n - 1) {
                prev.flags |= PYFRAME_RUN_END;
            }
        }
        return 0;
    }

    let raw = hdr_field(&hdr, cfg.frame_lasti_off);
    let lasti = if cfg.layout == layout::FRAME_OBJECT {
        let v = raw as u32 as i32;
        if v < 0 { PY_LASTI_NONE } else { v as u32 }
    } else {
        let base = code + cfg.code_adaptive_off as u64;
        if raw < base || raw - base > (u32::MAX as u64) {
            PY_LASTI_NONE
        } else {
            ((raw - base) / 2) as u32
        }
    };
    if cfg.pycode_type != 0 {
        match read_user_u64(code + 8) {
            Some(t) if t == cfg.pycode_type => {}
            Some(_) => flags |= PYFRAME_NOT_CODE,
            None => flags |= PYFRAME_CODE_UNREAD,
        }
    }
    if let Some(slot) = py.frames.get_mut(n) {
        slot.code = code;
        slot.lasti = lasti;
        slot.flags = flags;
        w.n = n as u64 + 1;
    }
    0
}

extern "C" fn step_old(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` passed to bpf_loop by `walk`.
    step::<OLD_HDR_WORDS>(unsafe { &mut *(ctx as *mut Walk) })
}

extern "C" fn step_new(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` passed to bpf_loop by `walk`.
    step::<NEW_HDR_WORDS>(unsafe { &mut *(ctx as *mut Walk) })
}

/// Walk the chain starting at `frame` into `py` (innermost first), with `bpf_loop` so the
/// verifier checks one step instead of every iteration.
#[inline(always)]
fn walk(cfg: &PyProcConfig, frame: u64, py: &mut PyStack) {
    let mut w = Walk {
        cfg: cfg as *const _,
        py: py as *mut _,
        frame,
        n: 0,
    };
    let callback = if cfg.layout == layout::FRAME_OBJECT {
        step_old as *mut core::ffi::c_void
    } else {
        step_new as *mut core::ffi::c_void
    };
    // SAFETY: helper call with a static callback and a pointer to a live stack struct.
    unsafe {
        bpf_loop(
            MAX_ITERATIONS as u32,
            callback,
            &mut w as *mut Walk as *mut core::ffi::c_void,
            0,
        );
    }
    let n = if (w.n as usize) < MAX_PY_FRAMES {
        w.n as usize
    } else {
        MAX_PY_FRAMES
    };
    if w.frame != 0 {
        py.truncated = 1;
        bump(PyStat::Truncated, 1);
    } else if n > 0 {
        if let Some(last) = py.frames.get_mut(n - 1) {
            last.flags |= PYFRAME_RUN_END;
        }
    }
    py.count = n as u32;
    bump(PyStat::Frames, n as u64);
}

/// Per CPU: whether the thread of the last [`collect`] holds the GIL (`GIL_*`). Kept in a map
/// rather than returned: a value carried in a register through the walk would have the
/// verifier check the walk once per value (over its instruction limit).
#[map(name = "PY_GIL_STATE")]
static PY_GIL_STATE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The GIL state the last [`collect`] on this CPU found.
#[inline(always)]
pub fn last_gil_state() -> u32 {
    PY_GIL_STATE.get(0).copied().unwrap_or(GIL_UNKNOWN)
}

#[inline(always)]
fn set_gil_state(state: u32) {
    if let Some(p) = PY_GIL_STATE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p = state };
    }
}

/// Record the Python frames of the current thread of process `tgid` into `py` (count 0 when the
/// process is not a registered Python process or the thread runs no Python code), and whether
/// the thread holds the GIL ([`last_gil_state`]).
#[inline(always)]
pub fn collect<C: EbpfContext>(_ctx: &C, tgid: u32, py: &mut PyStack) {
    py.count = 0;
    py.truncated = 0;
    set_gil_state(GIL_UNKNOWN);
    // SAFETY: the value is only read during this program run.
    let cfg = match unsafe { PY_PROCS.get(&tgid) } {
        Some(c) => c,
        None => return,
    };
    let g = match PY_GLOBAL.get(0) {
        Some(g) if g.enabled != 0 => g,
        _ => return,
    };
    bump(PyStat::Walks, 1);
    let tstate = match current_thread_state(cfg, g) {
        Some(t) => t,
        None => return,
    };
    note_gil(cfg, tstate);
    let frame = top_frame(cfg, tstate);
    if frame == 0 {
        bump(PyStat::NoFrame, 1);
        return;
    }
    walk(cfg, frame, py);
}

/// Notes whether the thread whose state is `tstate` holds the GIL: the GIL is locked and its
/// last holder is this thread (every CPython 3.8–3.14 with a GIL).
#[inline(always)]
fn note_gil(cfg: &PyProcConfig, tstate: u64) {
    if cfg.gil == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_user checks the address.
    let locked = unsafe { bpf_probe_read_user((cfg.gil + GIL_LOCKED_OFF) as *const i32) };
    let holder = read_user_u64(cfg.gil + GIL_LAST_HOLDER_OFF);
    set_gil_state(match (locked, holder) {
        (Ok(1), Some(h)) if h == tstate => GIL_HELD,
        (Ok(_), _) => GIL_RELEASED,
        _ => GIL_UNKNOWN,
    });
}

/// A forked child runs its parent's interpreter at the same addresses (the address space is
/// copied): walk it from its first tick, before user space has looked at it.
#[inline(always)]
pub fn inherit(parent: u32, child: u32) {
    // SAFETY: the value is only read during this program run.
    if let Some(cfg) = unsafe { PY_PROCS.get(&parent) } {
        let _ = PY_PROCS.insert(&child, cfg, 0);
    }
}

/// An `exec` replaced the process's image: its entry no longer describes it (user space
/// registers it again if the new image is CPython).
#[inline(always)]
pub fn forget(tgid: u32) {
    let _ = PY_PROCS.remove(&tgid);
}

/// Stand-alone sampler used by the Python kernel tests and the benchmark: for registered Python
/// processes only, emit the Python stack of the interrupted thread into `PY_TEST_EVENTS`.
#[perf_event]
pub fn kprof_py_test(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup.
    if unsafe { PY_PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    let Some(mut entry) = PY_TEST_EVENTS.reserve::<PyTestEvent>(0) else {
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at reserved ring buffer memory of the right size.
    unsafe {
        (*ev).tgid = tgid;
        (*ev).tid = pid_tgid as u32;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
        collect(&ctx, tgid, &mut (*ev).stack);
    }
    entry.submit(0);
    0
}
