//! The memory source.
//!
//! - Growth: a software perf event counting minor page faults on every CPU, sampled one in
//!   `period` (user space sets the period): a fault is memory a thread touched for the first
//!   time, so a sample in a targeted thread records who made the process's memory grow, with
//!   the faulting address (user space checks later whether that page is still held).
//! - Release and growth (raw tracepoint `sys_exit`, [`kprof_common::memsys`]), as each call
//!   returns, from its arguments and result. A target giving memory back to the kernel
//!   (`munmap`, `madvise(DONTNEED/FREE/REMOVE)`, a shrinking or moved `mremap`, a lowered
//!   `brk`) is a header-only record with the range, so a page sampled before is not counted as
//!   held once its memory was given back and mapped again for something else. A target's
//!   `mmap` of anonymous memory, growing `mremap` or raised `brk` is recorded with its stacks:
//!   the exact size of each large block and who asked for it. Each process's break is kept
//!   (`BREAKS`) to tell how far a `brk` moved it. One hook, at exit only: every syscall of the
//!   node passes a hooked syscall tracepoint, and each hook costs them all.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    helpers::generated::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::LruHashMap,
    programs::{PerfEventContext, RawTracePointContext},
};
use kprof_common::{EventHeader, EventKind, PAGE_BYTES, Stat, memsys};

use crate::{
    KPROF_CONFIG,
    maps::{bump, target_slot},
    record::{self, Event},
    unwind,
};

#[inline(always)]
pub fn on_fault<const PYTHON: bool>(ctx: &PerfEventContext) -> u32 {
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 {
        return 0;
    }
    let cfg = KPROF_CONFIG.load();
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    bump(Stat::PageFaults);
    // SAFETY: the context of a perf_event program points at its `bpf_perf_event_data`: the
    // registers at the fault, the event's period and the faulting address.
    let (in_kernel, period, addr) = unsafe {
        let d = &*ctx.ctx;
        (d.regs.cs & 3 == 0, d.sample_period, d.addr)
    };
    let ev = Event {
        kind: EventKind::PageFault,
        value: period.saturating_mul(PAGE_BYTES),
        // SAFETY: helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
        slot,
        in_kernel,
        kernel_stack: true,
        wait: 0,
        addr,
        user_regs_set: !in_kernel && {
            // SAFETY: as above.
            let regs = unsafe { &(*ctx.ctx).regs };
            unwind::start_from(record::BUF_FAULT, regs.rip, regs.rsp, regs.rbp)
        },
    };
    record::submit::<_, PYTHON>(ctx, &ev, &cfg, record::BUF_FAULT);
    0
}

/// x86-64 `struct pt_regs`: where a syscall's number, first four arguments and the user
/// registers the unwinder starts from are.
const PT_REGS_BP: usize = 32;
const PT_REGS_R10: usize = 56;
const PT_REGS_DX: usize = 96;
const PT_REGS_SI: usize = 104;
const PT_REGS_DI: usize = 112;
const PT_REGS_ORIG_AX: usize = 120;
const PT_REGS_IP: usize = 128;
const PT_REGS_SP: usize = 152;

/// Process → its break after its last `brk` (LRU: exited processes age out; after an `exec`
/// the first `brk` is glibc's query, which sets it again).
#[map(name = "BREAKS")]
static BREAKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// A register of the `struct pt_regs` at `regs` (0 when unreadable).
#[inline(always)]
unsafe fn reg(regs: *const u8, off: usize) -> u64 {
    // SAFETY: a probe read, which fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(regs.add(off).cast::<u64>()).unwrap_or(0) }
}

/// `sys_exit(struct pt_regs *regs, long ret)`, in the calling thread.
#[inline(always)]
pub fn on_syscall_exit<const PYTHON: bool>(ctx: &RawTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: a probe read of the caller's registers (every syscall of the node passes here:
    // the number is checked before anything else).
    let nr = unsafe { reg(regs, PT_REGS_ORIG_AX) };
    if !memsys::is_memsys(nr) {
        return 0;
    }
    let cfg = KPROF_CONFIG.load();
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    let ret: u64 = ctx.arg(1);
    // SAFETY: probe reads of the caller's argument registers.
    let args = unsafe {
        [
            reg(regs, PT_REGS_DI),
            reg(regs, PT_REGS_SI),
            reg(regs, PT_REGS_DX),
            reg(regs, PT_REGS_R10),
        ]
    };
    let old_break = if nr == memsys::SYS_BRK {
        // SAFETY: the value is copied out before the entry is replaced.
        let before = unsafe { BREAKS.get(&tgid).copied().unwrap_or(0) };
        if ret != 0 && (ret as i64) > 0 {
            let _ = BREAKS.insert(&tgid, &ret, 0);
        }
        before
    } else {
        0
    };
    if let Some((addr, len)) = memsys::released(nr, args, ret, old_break) {
        record::submit_header(&EventHeader {
            addr,
            value: len,
            ..record::header(EventKind::MemRelease, pid_tgid, slot)
        });
    }
    let Some((addr, len)) = memsys::added(nr, args, ret, old_break) else {
        return 0;
    };
    bump(Stat::MemGrowths);
    let ev = Event {
        kind: EventKind::MemGrow,
        value: len,
        // SAFETY: helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
        slot,
        in_kernel: true,
        // The kernel frames are the syscall's exit path: the same for every record.
        kernel_stack: false,
        wait: 0,
        addr,
        // SAFETY: probe reads of the user registers the syscall saved.
        user_regs_set: unsafe {
            unwind::start_from(
                record::BUF_TASK,
                reg(regs, PT_REGS_IP),
                reg(regs, PT_REGS_SP),
                reg(regs, PT_REGS_BP),
            )
        },
    };
    record::submit::<_, PYTHON>(ctx, &ev, &cfg, record::BUF_TASK);
    0
}
