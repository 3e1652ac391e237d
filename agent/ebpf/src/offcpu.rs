//! The off-CPU source (raw tracepoint `sched_switch`, in the thread leaving the CPU): when a
//! targeted thread leaves the CPU its state is kept by thread id in `OFF_CPU`, and when it comes
//! back the interval is settled. Stacks are captured at the switch-out (there the leaving thread
//! is `current`, so the user stack and the Python walker work as for a CPU sample), at most one
//! per `offcpu_gap_ns` of the thread's time (a token bucket): a captured switch-out becomes an
//! `OffCpu` record and its end an `OffCpuEnd` record with the duration; the time of the waits
//! not captured is summed per thread and stratum in the map, which user space reads, so totals
//! stay exact while the cost per thread stays bounded.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    helpers::generated::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::map,
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use kprof_common::{Config, EventHeader, EventKind, MAX_OFF_CPU_THREADS, OffCpuThread, Stat, wait};

use crate::{
    KPROF_CONFIG,
    maps::{bump, target_slot},
    record::{self, Event},
};

#[map(name = "OFF_CPU")]
pub static OFF_CPU: LruHashMap<u32, OffCpuThread> =
    LruHashMap::with_max_entries(MAX_OFF_CPU_THREADS, 0);

/// x86-64: the kernel stack is `THREAD_SIZE` (16 KiB) and the user registers of a thread in a
/// syscall are the `struct pt_regs` (168 bytes) at its top.
const THREAD_SIZE: usize = 16 << 10;
const PT_REGS_SIZE: usize = 168;
const PT_REGS_DI: usize = 112;
const PT_REGS_AX: usize = 80;
const PT_REGS_ORIG_AX: usize = 120;
/// `TASK_DEAD` in `prev_state`: the thread's last switch-out (it exited).
const TASK_DEAD: u64 = 0x80;
/// `pt_regs->ax` while a syscall runs (the entry code presets it to `-ENOSYS`): tells a syscall
/// from an exception, whose `orig_ax` is an error code.
const AX_IN_SYSCALL: i64 = -38;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`, run by `prev` (`current`).
#[inline(always)]
pub fn on_switch<const PYTHON: bool>(ctx: &RawTracePointContext) -> i32 {
    let cfg = KPROF_CONFIG.load();
    // The clock is read only for a tracked thread: an untargeted switch pays two lookups.
    let mut now = 0;
    switched_in(ctx, &mut now, &cfg);
    switched_out::<PYTHON>(ctx, &mut now, &cfg);
    0
}

/// `bpf_ktime_get_ns`, read once per program run.
#[inline(always)]
fn clock(now: &mut u64) -> u64 {
    if *now == 0 {
        // SAFETY: helper without arguments.
        *now = unsafe { bpf_ktime_get_ns() };
    }
    *now
}

/// `next` runs again: settles its interval if it is a tracked thread (one lookup otherwise).
#[inline(always)]
fn switched_in(ctx: &RawTracePointContext, now: &mut u64, cfg: &Config) {
    let next: *const u8 = ctx.arg(2);
    // SAFETY: probe read of `pid` in `next`'s task_struct at its BTF offset.
    let Ok(tid) =
        (unsafe { bpf_probe_read_kernel(next.add(cfg.task_pid_off as usize).cast::<u32>()) })
    else {
        return;
    };
    let Some(t) = OFF_CPU.get_ptr_mut(&tid) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; a thread's entry is written only by its own
    // switch-out and switch-in, which the scheduler serialises.
    unsafe {
        let ts_out = (*t).ts_out;
        if ts_out == 0 {
            return;
        }
        let now = clock(now);
        if now < ts_out {
            return;
        }
        let off = now - ts_out;
        (*t).ts_out = 0;
        if (*t).captured != 0 {
            (*t).captured = 0;
            // Assembled in the source's record buffer, not on the stack (the program's stack
            // is at the verifier's limit with the walkers' frames).
            if let Some(h) = record::header_buf(record::BUF_SWITCH) {
                *h = EventHeader {
                    kind: EventKind::OffCpuEnd as u32,
                    tgid: (*t).tgid,
                    tid,
                    cpu: bpf_get_smp_processor_id(),
                    slot: (*t).slot,
                    timestamp_ns: now,
                    value: off,
                    wait: (*t).wait,
                    addr: (*t).addr,
                    ..EventHeader::default()
                };
                if record::submit_header(h) {
                    return;
                }
            }
        }
        // Not captured (or its end was lost): into the thread's uncaptured time.
        let s = wait::stratum((*t).wait);
        if s < wait::STRATA {
            (*t).rest_ns[s] += off;
            (*t).rest_count[s] += 1;
        }
    }
}

/// `prev` (the current thread) leaves the CPU: a targeted thread's wait starts here.
#[inline(always)]
fn switched_out<const PYTHON: bool>(ctx: &RawTracePointContext, now: &mut u64, cfg: &Config) {
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 {
        return; // idle task
    }
    let Some(slot) = target_slot(tgid, cfg) else {
        return;
    };
    let prev_state: u64 = ctx.arg(3);
    if prev_state & TASK_DEAD != 0 {
        // The thread exited: nothing waits. Its entry (not waiting since its last switch-in)
        // stays until user space has read its last sums and sees the thread gone.
        return;
    }
    bump(Stat::SwitchOuts);
    let now = clock(now);
    let (nr, addr) = syscall(cfg);
    let w = wait::of_raw(prev_state as u32, nr);
    let s = wait::stratum(w);
    if s >= wait::STRATA {
        return;
    }

    let t = match OFF_CPU.get_ptr_mut(&tid) {
        Some(t) => t,
        None => {
            let full = cfg.offcpu_gap_ns.wrapping_mul(cfg.offcpu_burst as u64) as u32;
            let fresh = OffCpuThread {
                // A new thread starts with full buckets: its first waits are all captured.
                credit_ns: [full; wait::STRATA],
                credit_at: now,
                tgid,
                slot,
                ..OffCpuThread::default()
            };
            if OFF_CPU.insert(&tid, &fresh, 0).is_err() {
                return;
            }
            match OFF_CPU.get_ptr_mut(&tid) {
                Some(t) => t,
                None => return,
            }
        }
    };
    // SAFETY: pointer from a successful lookup (see `switched_in`).
    let capture = unsafe {
        // Every kind of wait earns credit with time; this one spends from its own bucket
        // (`s` < STRATA, checked above).
        let cap = cfg.offcpu_gap_ns.wrapping_mul(cfg.offcpu_burst as u64);
        let earned = now.saturating_sub((*t).credit_at);
        (*t).credit_at = now;
        let mut capture = false;
        for i in 0..wait::STRATA {
            let mut credit = ((*t).credit_ns[i] as u64).saturating_add(earned);
            if credit > cap {
                credit = cap;
            }
            if i == s && credit >= cfg.offcpu_gap_ns {
                capture = true;
                credit -= cfg.offcpu_gap_ns;
            }
            (*t).credit_ns[i] = credit as u32;
        }
        (*t).tgid = tgid;
        (*t).slot = slot;
        (*t).wait = w;
        (*t).addr = addr;
        capture
    };
    let mut captured = false;
    if capture {
        let ev = Event {
            kind: EventKind::OffCpu,
            value: 0,
            now,
            pid_tgid,
            slot,
            in_kernel: true,
            kernel_stack: true,
            wait: w,
            addr,
            user_regs_set: false,
        };
        captured = record::submit::<_, PYTHON>(ctx, &ev, cfg, record::BUF_SWITCH);
        if captured {
            bump(Stat::SwitchOutsCaptured);
        }
    }
    // SAFETY: as above; the entry may have been evicted and reused meanwhile, which at worst
    // misattributes one interval.
    unsafe {
        (*t).captured = u32::from(captured);
        (*t).ts_out = now;
    }
}

/// The syscall the current thread is in and its first argument, from the user registers at the
/// top of its kernel stack (`wait::NO_SYSCALL`: not in a syscall, or the stack offset is
/// unknown).
#[inline(always)]
fn syscall(cfg: &Config) -> (u32, u64) {
    if cfg.task_stack_off == 0 {
        return (wait::NO_SYSCALL, 0);
    }
    // SAFETY: probe reads of the current task's `stack` pointer and of its saved registers; a
    // bad offset only makes a read fail.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(stack) =
            bpf_probe_read_kernel(task.add(cfg.task_stack_off as usize).cast::<*const u8>())
        else {
            return (wait::NO_SYSCALL, 0);
        };
        let regs = stack.wrapping_add(THREAD_SIZE - PT_REGS_SIZE);
        let ax = bpf_probe_read_kernel(regs.wrapping_add(PT_REGS_AX).cast::<i64>()).unwrap_or(0);
        let nr =
            bpf_probe_read_kernel(regs.wrapping_add(PT_REGS_ORIG_AX).cast::<i64>()).unwrap_or(-1);
        if ax != AX_IN_SYSCALL || !(0..0x10000).contains(&nr) {
            return (wait::NO_SYSCALL, 0);
        }
        let di = bpf_probe_read_kernel(regs.wrapping_add(PT_REGS_DI).cast::<u64>()).unwrap_or(0);
        (nr as u32, di)
    }
}
