//! CPython support: the kernel/user-space ABI of the in-kernel Python frame walker.
//!
//! User space (`agent/src/python`) detects CPython in a target process, fills one
//! [`PyProcConfig`] per process into the `PY_PROCS` map and the [`PyGlobalConfig`] (kernel
//! offsets from BTF) into `PY_GLOBAL`. The eBPF walker (`agent/ebpf/src/python.rs`) finds the
//! sampled thread's `PyThreadState` through the interpreter's TSS key (pthread_getspecific
//! emulation on the thread's `fsbase`) and records `(code object, instruction offset, flags)`
//! per frame into a [`PyStack`]. Names, files and lines are resolved later, in user space.
//!
//! Every type is `#[repr(C)]`, has no `bool` and no implicit padding; sizes are asserted.

use core::mem::size_of;

/// Maximum number of Python frames captured per sample. A deeper stack sets
/// [`PyStack::truncated`] and keeps the innermost `MAX_PY_FRAMES` frames.
pub const MAX_PY_FRAMES: usize = 128;

/// Capacity of the `PY_PROCS` map (Python processes registered at once).
pub const MAX_PY_PROCS: u32 = 4096;

/// Names of the Python maps and programs, used by the loader and tests.
pub mod names {
    /// `HashMap<u32 tgid, PyProcConfig>`.
    pub const MAP_PY_PROCS: &str = "PY_PROCS";
    /// `Array<PyGlobalConfig>` with one entry.
    pub const MAP_PY_GLOBAL: &str = "PY_GLOBAL";
    /// `PerCpuArray<u64>` of [`super::PyStat`] counters.
    pub const MAP_PY_STATS: &str = "PY_STATS";
    /// Ring buffer of the stand-alone test program (`PyTestEvent`).
    pub const MAP_PY_TEST_EVENTS: &str = "PY_TEST_EVENTS";
    /// Stand-alone `perf_event` program that only walks Python stacks (tests, benchmarks).
    pub const PROG_PY_TEST: &str = "kprof_py_test";
}

/// `PyFrame::flags` bit: this frame is the outermost (caller-most) Python frame of one
/// activation of the interpreter's eval loop (`_PyEval_EvalFrameDefault`). The run of frames
/// from the previous run end (exclusive) to this one (inclusive) belongs to one native eval frame.
pub const PYFRAME_RUN_END: u32 = 1;
/// `PyFrame::flags` bit: the frame's code pointer is not a `PyCodeObject` (`ob_type` differs
/// from `PyCode_Type`). User space drops or marks it.
pub const PYFRAME_NOT_CODE: u32 = 1 << 1;
/// `PyFrame::flags` bit: the code object could not be read in kernel (paged out, or a torn
/// read). User space resolves it with `process_vm_readv` as usual.
pub const PYFRAME_CODE_UNREAD: u32 = 1 << 2;

/// `PyFrame::lasti` value meaning "no instruction started yet" (CPython's `lasti == -1`).
pub const PY_LASTI_NONE: u32 = u32::MAX;

/// One Python frame as captured in kernel: the code object and the instruction offset.
///
/// `lasti` is in the unit of the interpreter version: bytes for ≤ 3.9 (`f_lasti`), code units
/// (2 bytes) for 3.10 (`f_lasti`) and 3.11+ (`(instr_ptr − co_code_adaptive) / 2`);
/// [`PY_LASTI_NONE`] before the first instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub lasti: u32,
    /// `PYFRAME_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<PyFrame>() == 16);

/// The Python frame chain of one sample, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    /// Valid entries in `frames`.
    pub count: u32,
    /// Non-zero when the chain was deeper than `MAX_PY_FRAMES` (outer frames are missing).
    pub truncated: u32,
    pub frames: [PyFrame; MAX_PY_FRAMES],
}
const _: () = assert!(size_of::<PyStack>() == 8 + MAX_PY_FRAMES * 16);

/// A borrowed Python stack as user space reads it from a record: the frames captured, innermost
/// first, and whether outer ones are missing.
#[derive(Clone, Copy, Debug, Default)]
pub struct PyFrames<'a> {
    pub frames: &'a [PyFrame],
    /// The chain was deeper than [`MAX_PY_FRAMES`]: the outermost frames are missing.
    pub truncated: bool,
}

/// How the walker reaches the top frame from the thread state and how entries are marked.
/// `PyProcConfig::layout`.
pub mod layout {
    /// ≤ 3.10: `tstate->frame` is a `PyFrameObject*`; `f_lasti` is an `int`; each frame is
    /// its own eval-loop activation.
    pub const FRAME_OBJECT: u32 = 1;
    /// 3.11: `tstate->cframe->current_frame`; `prev_instr` pointer; `is_entry` byte.
    pub const CFRAME_IS_ENTRY: u32 = 2;
    /// 3.12: `tstate->cframe->current_frame`; `prev_instr` pointer; `owner` byte, shim frames
    /// (`owner == shim_owner`) delimit eval activations.
    pub const CFRAME_OWNER: u32 = 3;
    /// 3.13+: `tstate->current_frame`; `instr_ptr` pointer (maybe tagged executable); `owner`
    /// byte delimits eval activations.
    pub const CURRENT_FRAME_OWNER: u32 = 4;
}

/// Per-process configuration of the walker (value of `PY_PROCS`, keyed by tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcConfig {
    /// `PY_VERSION_HEX >> 16`, e.g. `0x030c` for 3.12.
    pub version: u32,
    /// One of [`layout`].
    pub layout: u32,
    /// The gilstate TSS key (`pthread_key_t`) of the main interpreter.
    pub tss_key: u32,
    /// glibc/musl TSD emulation: when not `u32::MAX`, the thread descriptor is read as a pointer
    /// at `fsbase + tsd_self_off` (glibc `tcbhead_t.self` = 0x10); otherwise it is `fsbase`.
    pub tsd_self_off: u32,
    /// When non-zero, the key array is reached through one more pointer at
    /// `descriptor + tsd_base_off` (musl `pthread.tsd`); else it starts at that offset (glibc
    /// `specific_1stblock`).
    pub tsd_indirect: u32,
    /// Offset of the key array in (or, with `tsd_indirect`, of its pointer in) the descriptor.
    pub tsd_base_off: u32,
    /// Size of one key slot (glibc 16, musl 8).
    pub tsd_key_size: u32,
    /// Offset of the value in one key slot (glibc 8, musl 0).
    pub tsd_val_off: u32,
    /// Keys below this are supported by the direct array (glibc 32).
    pub tsd_max_key: u32,
    /// `tstate->frame` (≤3.10), `tstate->cframe` (3.11/3.12) or `tstate->current_frame` (3.13+).
    pub tstate_frame_off: u32,
    /// `_PyCFrame.current_frame` (3.11/3.12); unused otherwise.
    pub cframe_frame_off: u32,
    /// `f_back` / `previous`.
    pub frame_back_off: u32,
    /// `f_code` / `f_executable`.
    pub frame_code_off: u32,
    /// `f_lasti` (int, ≤3.10) or `prev_instr`/`instr_ptr` (pointer, 3.11+).
    pub frame_lasti_off: u32,
    /// `is_entry` (3.11) or `owner` (3.12+) byte; `u32::MAX` when absent.
    pub frame_owner_off: u32,
    /// `owner` value of a C-stack shim / interpreter entry frame (3 for 3.12–3.14).
    pub shim_owner: u32,
    /// `offsetof(PyCodeObject, co_code_adaptive)` (3.11+), to turn `instr_ptr` into `lasti`.
    pub code_adaptive_off: u32,
    pub _pad: u32,
    /// Address of `PyCode_Type` in the target (0: do not check the type of code objects).
    pub pycode_type: u64,
    /// Mask applied to `f_executable` (`!3` for 3.14's tagged `_PyStackRef`, else `!0`).
    pub code_mask: u64,
    /// Address of the GIL (`struct _gil_runtime_state`: `last_holder` at +8, `locked` at +16);
    /// 0 when not found. A CPU sample then says whether its thread holds the GIL.
    pub gil: u64,
}
const _: () = assert!(size_of::<PyProcConfig>() == 18 * 4 + 24);

/// What the walker learnt about the GIL (kept per CPU in `PY_GIL_STATE` by the walker, turned
/// into header flags by the record path): nothing (no GIL address, or unreadable).
pub const GIL_UNKNOWN: u32 = 0;
/// The thread does not hold the GIL.
pub const GIL_RELEASED: u32 = 1;
/// The thread holds the GIL (`locked` and `last_holder` is its thread state).
pub const GIL_HELD: u32 = 2;
/// `PyProcConfig::gil` offsets.
pub const GIL_LAST_HOLDER_OFF: u64 = 8;
pub const GIL_LOCKED_OFF: u64 = 16;

/// Global (kernel-level) configuration of the walker (the single entry of `PY_GLOBAL`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyGlobalConfig {
    /// Byte offset of `thread.fsbase` in `struct task_struct` (from `/sys/kernel/btf/vmlinux`).
    pub task_fsbase_off: u32,
    /// Non-zero once user space has written the configuration.
    pub enabled: u32,
}
const _: () = assert!(size_of::<PyGlobalConfig>() == 8);

/// Counters kept per CPU in `PY_STATS` (index = discriminant). Never reuse an index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyStat {
    /// Walks attempted (samples of registered Python processes).
    Walks = 0,
    /// Walks that found no thread state (thread without Python, or not yet initialised).
    NoThreadState = 1,
    /// Reading `fsbase` or the TSD slot failed.
    TsdReadErr = 2,
    /// A frame read failed mid-chain (the stack is cut there).
    FrameReadErr = 3,
    /// Stacks deeper than `MAX_PY_FRAMES`.
    Truncated = 4,
    /// Frames recorded.
    Frames = 5,
    /// The thread had a thread state but no frame (idle in C, between calls).
    NoFrame = 6,
}

impl PyStat {
    pub const COUNT: u32 = 7;
    pub const ALL: [PyStat; Self::COUNT as usize] = [
        PyStat::Walks,
        PyStat::NoThreadState,
        PyStat::TsdReadErr,
        PyStat::FrameReadErr,
        PyStat::Truncated,
        PyStat::Frames,
        PyStat::NoFrame,
    ];
}

/// Event of the stand-alone test program `kprof_py_test`: one Python stack per sample.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyTestEvent {
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub stack: PyStack,
}
const _: () = assert!(size_of::<PyTestEvent>() == 24 + size_of::<PyStack>());

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and arrays of integers only, no padding (sizes asserted).
    unsafe impl aya::Pod for super::PyFrame {}
    unsafe impl aya::Pod for super::PyStack {}
    unsafe impl aya::Pod for super::PyProcConfig {}
    unsafe impl aya::Pod for super::PyGlobalConfig {}
    unsafe impl aya::Pod for super::PyTestEvent {}
}
