//! The CPU source: every tick of the sampling clock (a software cpu-clock perf event per CPU,
//! its period jittered by user space) notes its time, so a sample knows the CPU time it stands
//! for; a tick in a targeted thread is recorded as a [`EventKind::CpuSample`].
use aya_ebpf::{
    helpers::generated::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::PerCpuArray,
    programs::PerfEventContext,
};
use kprof_common::{EventKind, Stat};

use crate::{
    KPROF_CONFIG,
    maps::{bump, target_slot},
    record::{self, Event},
    unwind,
};

/// Per CPU: `bpf_ktime_get_ns` of the sampling clock's previous tick. Every tick passes here,
/// idle and untargeted ones included, so a sample knows exactly how much CPU time it stands for
/// although user space keeps changing the clock's period (`agent/src/kernel/clock.rs`).
#[map(name = "LAST_TICK")]
static LAST_TICK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Records this tick; returns the nanoseconds since the previous one on this CPU (0: none yet).
#[inline(always)]
fn tick(now: u64) -> u64 {
    let Some(last) = LAST_TICK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, the program is not re-entered on the same CPU.
    unsafe {
        let prev = *last;
        *last = now;
        if prev == 0 || now < prev {
            0
        } else {
            now - prev
        }
    }
}

#[inline(always)]
pub fn on_tick<const PYTHON: bool>(ctx: &PerfEventContext) -> u32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let tick_ns = tick(now);
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 {
        return 0; // idle task
    }
    let cfg = KPROF_CONFIG.load();
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    bump(Stat::Targeted);
    // SAFETY: the context of a perf_event program points at its pt_regs.
    let in_kernel = unsafe { (*ctx.ctx).regs.cs & 3 == 0 };
    let ev = Event {
        kind: EventKind::CpuSample,
        value: tick_ns,
        now,
        pid_tgid,
        slot,
        in_kernel,
        kernel_stack: true,
        wait: 0,
        addr: 0,
        user_regs_set: !in_kernel && {
            // SAFETY: as above.
            let regs = unsafe { &(*ctx.ctx).regs };
            unwind::start_from(record::BUF_CPU, regs.rip, regs.rsp, regs.rbp)
        },
    };
    record::submit::<_, PYTHON>(ctx, &ev, &cfg, record::BUF_CPU);
    0
}
