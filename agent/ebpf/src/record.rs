//! The one path every source takes to record an event of a targeted thread: the header, the
//! Python frames, the kernel and the user stack, assembled in the per-CPU `EVENT_BUF` and
//! copied into the ring as one record exactly as long as its stacks (a CPU sample of a
//! 20-frame stack is ~0.5 KiB, not the 4 KiB of every stack at its largest).
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    cty::c_void,
    helpers::bpf_probe_read_kernel,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns, bpf_ringbuf_output,
    },
};
use kprof_common::{
    Config, EventHeader, EventKind, FLAG_GIL_HELD, FLAG_GIL_KNOWN, FLAG_IN_KERNEL,
    FLAG_KERNEL_STACK_ERR, FLAG_UNWIND_MISS, FLAG_USER_STACK_ERR, MAX_KERNEL_FRAMES,
    MAX_USER_FRAMES, Stat, event_len,
    python::{MAX_PY_FRAMES, PyFrame},
};

use crate::{
    maps::{EVENT_BUF, EVENTS, bump},
    unwind,
};

/// `BPF_F_USER_STACK` flag of `bpf_get_stack`.
const BPF_F_USER_STACK: u64 = 1 << 8;
/// `BPF_RB_NO_WAKEUP`: do not wake the reader on output. User space polls with a short timeout
/// instead; a wake-up per record costs an irq_work self-IPI (a VM exit under KVM).
const BPF_RB_NO_WAKEUP: u64 = 1;

/// What a source knows about the event it records.
pub struct Event {
    pub kind: EventKind,
    /// In the unit of `kind`.
    pub value: u64,
    /// `bpf_ktime_get_ns` at the event.
    pub now: u64,
    pub pid_tgid: u64,
    /// The target slot the process matched.
    pub slot: u32,
    /// The thread was in kernel mode (there are kernel frames to read).
    pub in_kernel: bool,
    /// Read the kernel stack when `in_kernel` (a thread creation's kernel frames are always
    /// the same `clone` path: not worth the record bytes).
    pub kernel_stack: bool,
    /// Off-CPU events: how the thread waits and the syscall's first argument.
    pub wait: u32,
    pub addr: u64,
    /// The source started the unwinder from the user registers it interrupted
    /// (`unwind::start_from`); otherwise those saved at the thread's entry into the kernel are
    /// used.
    pub user_regs_set: bool,
}

/// `EVENT_BUF` slot of each source: a source that can interrupt another needs its own.
pub const BUF_CPU: u32 = 0;
pub const BUF_SWITCH: u32 = 1;
/// Thread creations and memory growth: both run in the thread's own context with preemption
/// off, so neither interrupts the other.
pub const BUF_TASK: u32 = 2;
pub const BUF_FAULT: u32 = 3;
/// Allocation probes: a uprobe runs with only migration disabled, so it keeps a slot of its
/// own (a probe preempted by another process's probe on its CPU, possible on a fully
/// preemptible kernel, can still spoil that one record).
pub const BUF_PROBE: u32 = 4;

/// Records `ev` of the current thread with its stacks, assembled in `EVENT_BUF` slot `buf`;
/// the Python walker runs when `PYTHON`. Returns whether the record reached the ring.
#[inline(always)]
pub fn submit<C: EbpfContext, const PYTHON: bool>(
    ctx: &C,
    ev: &Event,
    cfg: &Config,
    buf: u32,
) -> bool {
    let source = buf;
    let Some(buf) = EVENT_BUF.get_ptr_mut(buf) else {
        return false;
    };
    let tgid = (ev.pid_tgid >> 32) as u32;
    // SAFETY: `buf` is this CPU's map value (not shared while the program runs); every header
    // field is written below before the record is copied out, and the stacks are written
    // within the value: the Python frames at its fixed place, the native stacks after the
    // frames found, each bounded by its maximum (the sizes add up to `EventBuf`).
    unsafe {
        // Python first: the walker's bounded loop is verified once per distinct register state,
        // so it runs before the branches below (stack errors, flags) multiply the states.
        (*buf).header.py_count = 0;
        (*buf).header.py_truncated = 0;
        #[cfg(feature = "python")]
        if PYTHON {
            // The walker writes a PyStack in place: its count and truncated flag are the
            // header's last two fields and its frames follow the header (asserted in common).
            let py = (buf as *mut u8)
                .add(core::mem::offset_of!(EventHeader, py_count))
                .cast::<kprof_common::python::PyStack>();
            crate::python::collect(ctx, tgid, &mut *py);
        }
        let mut py_count = (*buf).header.py_count as usize;
        if py_count > MAX_PY_FRAMES {
            py_count = MAX_PY_FRAMES;
        }

        let h = &raw mut (*buf).header;
        (*h).kind = ev.kind as u32;
        (*h).value = ev.value;
        (*h).tgid = tgid;
        (*h).tid = ev.pid_tgid as u32;
        (*h).cpu = bpf_get_smp_processor_id();
        (*h).slot = ev.slot;
        (*h).timestamp_ns = ev.now;
        (*h).cgroup_id = if cfg.cgroup_filter != 0 {
            bpf_get_current_cgroup_id()
        } else {
            0
        };
        (*h).comm = [0; 16];
        bpf_get_current_comm((*h).comm.as_mut_ptr().cast(), 16);
        (*h).exec_id = if cfg.task_exec_id_off != 0 {
            let task = bpf_get_current_task() as *const u8;
            bpf_probe_read_kernel(task.add(cfg.task_exec_id_off as usize).cast::<u32>())
                .unwrap_or(0)
        } else {
            0
        };
        (*h).wait = ev.wait;
        (*h).addr = ev.addr;

        let mut flags = 0u32;
        if ev.in_kernel {
            flags |= FLAG_IN_KERNEL;
        }
        #[cfg(feature = "python")]
        if PYTHON {
            // Read here, not carried from the walk (see `python::PY_GIL_STATE`).
            let gil = crate::python::last_gil_state();
            if gil != kprof_common::python::GIL_UNKNOWN {
                flags |= FLAG_GIL_KNOWN;
                if gil == kprof_common::python::GIL_HELD {
                    flags |= FLAG_GIL_HELD;
                }
            }
        }
        let kernel_at =
            (buf as *mut u8).add(size_of::<EventHeader>() + py_count * size_of::<PyFrame>());
        // An event in user mode has no kernel frames: skip the helper (and its zeroing of the
        // whole buffer).
        let n = if ev.in_kernel && ev.kernel_stack {
            bpf_get_stack(
                ctx.as_ptr(),
                kernel_at.cast(),
                (MAX_KERNEL_FRAMES * 8) as u32,
                0,
            )
        } else {
            0
        };
        let kernel_len = if n >= 0 {
            (n as usize / 8).min(MAX_KERNEL_FRAMES)
        } else {
            flags |= FLAG_KERNEL_STACK_ERR;
            bump(Stat::KernelStackErr);
            0
        };

        let r = user_stack(
            ctx.as_ptr(),
            tgid,
            source,
            kernel_at.add(kernel_len * 8),
            u64::from(ev.user_regs_set),
        );
        let user_len = ((r & 0xffff) as usize).min(MAX_USER_FRAMES);
        flags |= (r >> 32) as u32;
        (*h).py_count = py_count as u32;
        (*h).kernel_len = kernel_len as u32;
        (*h).user_len = user_len as u32;
        (*h).flags = flags;

        let len = event_len(py_count, kernel_len, user_len);
        let ring = (&raw const EVENTS).cast::<c_void>().cast_mut();
        if bpf_ringbuf_output(ring, buf.cast(), len as u64, BPF_RB_NO_WAKEUP) != 0 {
            bump(Stat::Dropped);
            return false;
        }
        true
    }
}

/// The header of `EVENT_BUF` slot `buf`, to assemble a record without stacks in.
#[inline(always)]
pub fn header_buf(buf: u32) -> Option<&'static mut EventHeader> {
    let b = EVENT_BUF.get_ptr_mut(buf)?;
    // SAFETY: this CPU's buffer of the source (not re-entered on its CPU).
    Some(unsafe { &mut (*b).header })
}

/// The user stack of the current thread (of process `tgid`) into `dst`: unwound with the
/// tables (`unwind.rs`), else by the kernel's frame-pointer walk. Returns the number of frames
/// with the record's `FLAG_*` bits in the high 32 bits. A function of its own (a BPF
/// subprogram): inlined, what it keeps across its calls was spilled onto the sources' stacks,
/// and the scheduler source's stack with the CPython walker's frame went past the verifier's
/// 512 bytes.
#[inline(never)]
fn user_stack(ctx: *mut c_void, tgid: u32, source: u32, dst: *mut u8, regs_set: u64) -> u64 {
    let cfg = crate::KPROF_CONFIG.load();
    let mut flags = 0u64;
    if cfg.unwind_tables != 0 {
        let started = regs_set != 0 || unwind::start_from_saved(source, &cfg);
        let r = if started {
            unwind::unwind(tgid, source, dst)
        } else {
            unwind::NOT_UNWOUND
        };
        if r != unwind::NOT_UNWOUND {
            return r;
        }
        // No mappings loaded for this process yet: frame pointers this time.
        flags |= u64::from(FLAG_UNWIND_MISS) << 32;
        bump(Stat::UnwindMiss);
    }
    // SAFETY: `dst` has room for MAX_USER_FRAMES frames (the record buffer).
    let n = unsafe {
        bpf_get_stack(
            ctx,
            dst.cast(),
            (MAX_USER_FRAMES * 8) as u32,
            BPF_F_USER_STACK,
        )
    };
    if n >= 0 {
        flags | ((n as u64 / 8).min(MAX_USER_FRAMES as u64))
    } else {
        bump(Stat::UserStackErr);
        flags | (u64::from(FLAG_USER_STACK_ERR) << 32)
    }
}

/// The header of a record without stacks of the current thread: its kind, process, thread,
/// target slot, CPU and time; the source fills in what else it says.
#[inline(always)]
pub fn header(kind: EventKind, pid_tgid: u64, slot: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        slot,
        // SAFETY: helpers without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: as above.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..EventHeader::default()
    }
}

/// Writes a record without stacks (its header is complete).
#[inline(always)]
pub fn submit_header(h: &EventHeader) -> bool {
    let ring = (&raw const EVENTS).cast::<c_void>().cast_mut();
    // SAFETY: `h` is a whole header on the stack; the helper copies it.
    let ret = unsafe {
        bpf_ringbuf_output(
            ring,
            (h as *const EventHeader).cast_mut().cast(),
            size_of::<EventHeader>() as u64,
            BPF_RB_NO_WAKEUP,
        )
    };
    if ret != 0 {
        bump(Stat::Dropped);
        return false;
    }
    true
}
