//! The memory source.
//!
//! - Growth: a software perf event counting minor page faults on every CPU, sampled one in
//!   `period` (user space sets the period): a fault is memory a thread touched for the first
//!   time, so a sample in a targeted thread records who made the process's memory grow, with
//!   the faulting address (user space checks later whether that page is still held).
//! - Release (raw tracepoint `sys_enter`): a target giving memory back to the kernel
//!   (`munmap`, `madvise(DONTNEED/FREE/REMOVE)`, a shrinking `mremap` or `brk`) is a header-only
//!   record with the range, so a page sampled before is not counted as held once its memory
//!   was given back and mapped again for something else.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    programs::{PerfEventContext, RawTracePointContext},
};
use kprof_common::{EventHeader, EventKind, PAGE_BYTES, Stat, release};

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

/// x86-64 `struct pt_regs`: where a syscall's first three arguments are.
const PT_REGS_DX: usize = 96;
const PT_REGS_SI: usize = 104;
const PT_REGS_DI: usize = 112;

/// `sys_enter(struct pt_regs *regs, long id)`, in the calling thread.
#[inline(always)]
pub fn on_syscall(ctx: &RawTracePointContext) -> i32 {
    // The tracepoint's second argument is the syscall number.
    let nr: u64 = ctx.arg(1);
    if !matches!(
        nr,
        release::SYS_MUNMAP | release::SYS_MREMAP | release::SYS_MADVISE | release::SYS_BRK
    ) {
        return 0;
    }
    let cfg = KPROF_CONFIG.load();
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    // SAFETY: the tracepoint's first argument is the caller's `struct pt_regs`; its argument
    // registers are read with probe reads (a failed read gives 0, which releases nothing).
    let regs: *const u8 = ctx.arg(0);
    let (a0, a1, a2) = unsafe {
        let arg = |off: usize| bpf_probe_read_kernel(regs.add(off).cast::<u64>()).unwrap_or(0);
        (arg(PT_REGS_DI), arg(PT_REGS_SI), arg(PT_REGS_DX))
    };
    let Some((addr, len)) = release::range(nr, a0, a1, a2) else {
        return 0;
    };
    let mut h = EventHeader {
        kind: EventKind::MemRelease as u32,
        tgid,
        tid: pid_tgid as u32,
        slot,
        addr,
        value: len,
        ..EventHeader::default()
    };
    // SAFETY: helpers without arguments.
    unsafe {
        h.cpu = bpf_get_smp_processor_id();
        h.timestamp_ns = bpf_ktime_get_ns();
    }
    record::submit_header(&h);
    0
}
