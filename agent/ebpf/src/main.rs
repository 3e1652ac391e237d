//! kprof eBPF programs.
//!
//! - `kprof_sample` (perf_event, software cpu-clock on every CPU, period jittered by user space):
//!   it notes the tick's time (so a sample knows the CPU time it stands for), then one map lookup
//!   decides whether the interrupted thread belongs to a target; if so, the sample (kernel stack,
//!   user native stack, Python frames) is written straight into a ring-buffer slot for user space
//!   to aggregate.
//! - `kprof_fork` (raw tracepoint `sched_process_fork`): children of a targeted process inherit
//!   its target slot, so short-lived children are profiled from their first tick. A raw
//!   tracepoint needs no tracefs (not mounted in pods); the child's pid and tgid are read from
//!   its `task_struct` at offsets user space took from kernel BTF. A Python parent's walker
//!   configuration is copied to the child.
//! - `kprof_exec` (raw tracepoint `sched_process_exec`, with the walker): drops the walker's
//!   configuration of a process that replaced its image.
#![no_std]
#![no_main]

#[cfg(feature = "python")]
mod python;

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_smp_processor_id, bpf_get_stack, bpf_ktime_get_ns,
    },
    helpers::bpf_probe_read_kernel,
    macros::{map, perf_event, raw_tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{PerfEventContext, RawTracePointContext},
};
use kprof_common::{
    Config, EVENTS_RING_BYTES, FLAG_IN_KERNEL, FLAG_KERNEL_STACK_ERR, FLAG_USER_STACK_ERR,
    MAX_KERNEL_FRAMES, MAX_TARGET_CGROUPS, MAX_TARGET_PIDS, MAX_USER_FRAMES, SampleEvent, Stat,
    TargetSlot,
};

/// `BPF_F_USER_STACK` flag of `bpf_get_stack`.
const BPF_F_USER_STACK: u64 = 1 << 8;
/// `BPF_RB_NO_WAKEUP`: do not wake the reader on submit. User space polls with a short timeout
/// instead; a wake-up per sample costs an irq_work self-IPI (a VM exit under KVM).
const BPF_RB_NO_WAKEUP: u64 = 1;

/// Set by the loader (`EbpfLoader::override_global`); non-zero defaults keep it in `.rodata`.
#[unsafe(no_mangle)]
static KPROF_CONFIG: Global<Config> = Global::new(Config {
    cgroup_filter: 0,
    follow_children: 1,
    task_pid_off: 1,
    task_tgid_off: 1,
    task_exec_id_off: 0,
    _pad: 0,
});

#[map(name = "TARGET_PIDS")]
static TARGET_PIDS: HashMap<u32, TargetSlot> = HashMap::with_max_entries(MAX_TARGET_PIDS, 0);

#[map(name = "TARGET_CGROUPS")]
static TARGET_CGROUPS: HashMap<u64, TargetSlot> = HashMap::with_max_entries(MAX_TARGET_CGROUPS, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Per CPU: `bpf_ktime_get_ns` of the sampling clock's previous tick. Every tick passes here,
/// idle and untargeted ones included, so a sample knows exactly how much CPU time it stands for
/// although user space keeps changing the clock's period (`agent/src/perf.rs`).
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
        if prev == 0 || now < prev { 0 } else { now - prev }
    }
}

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, the program is not re-entered on the same CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn target_slot(tgid: u32, cfg: &Config) -> Option<u32> {
    if let Some(t) = TARGET_PIDS.get_ptr(tgid) {
        // SAFETY: the pointer comes from a successful lookup.
        return Some(unsafe { (*t).slot });
    }
    if cfg.cgroup_filter != 0 {
        // SAFETY: plain helper call without arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if let Some(t) = TARGET_CGROUPS.get_ptr(cgroup) {
            // SAFETY: the pointer comes from a successful lookup.
            return Some(unsafe { (*t).slot });
        }
    }
    None
}

/// The sampler with the CPython walker (the default).
#[perf_event]
pub fn kprof_sample(ctx: PerfEventContext) -> u32 {
    sample::<true>(ctx)
}

/// The same sampler without the CPython walker: loaded with `--no-python`, or when the kernel
/// rejects the walker, so native and kernel stacks always work.
#[perf_event]
pub fn kprof_sample_native(ctx: PerfEventContext) -> u32 {
    sample::<false>(ctx)
}

#[inline(always)]
fn sample<const PYTHON: bool>(ctx: PerfEventContext) -> u32 {
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

    let Some(mut entry) = EVENTS.reserve::<SampleEvent>(0) else {
        bump(Stat::Dropped);
        return 0;
    };
    let ev: *mut SampleEvent = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved ring-buffer slot of the right size; every header field is
    // written below before submit, the stack arrays are valid up to `*_len` entries.
    unsafe {
        // Python first: the walker's bounded loop is verified once per distinct register state,
        // so it runs before the branches below (stack errors, flags) multiply the states.
        (*ev).py.count = 0;
        (*ev).py.truncated = 0;
        #[cfg(feature = "python")]
        if PYTHON {
            python::collect(&ctx, tgid, &mut (*ev).py);
        }

        (*ev).tgid = tgid;
        (*ev).tid = pid_tgid as u32;
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).slot = slot;
        (*ev).timestamp_ns = now;
        (*ev).tick_ns = tick_ns;
        (*ev).cgroup_id = if cfg.cgroup_filter != 0 {
            bpf_get_current_cgroup_id()
        } else {
            0
        };
        (*ev).comm = [0; 16];
        bpf_get_current_comm((*ev).comm.as_mut_ptr().cast(), 16);
        (*ev).exec_id = if cfg.task_exec_id_off != 0 {
            let task = bpf_get_current_task() as *const u8;
            bpf_probe_read_kernel(task.add(cfg.task_exec_id_off as usize).cast::<u32>())
                .unwrap_or(0)
        } else {
            0
        };

        let mut flags = 0u32;
        let regs = &(*ctx.ctx).regs;
        if regs.cs & 3 == 0 {
            flags |= FLAG_IN_KERNEL;
        }

        // A sample that interrupted user mode has no kernel frames: skip the helper (and its
        // zeroing of the whole buffer).
        let n = if flags & FLAG_IN_KERNEL != 0 {
            bpf_get_stack(
                ctx.as_ptr(),
                (*ev).kernel_ips.as_mut_ptr().cast(),
                (MAX_KERNEL_FRAMES * 8) as u32,
                0,
            )
        } else {
            0
        };
        (*ev).kernel_len = if n >= 0 {
            (n as u32) / 8
        } else {
            flags |= FLAG_KERNEL_STACK_ERR;
            bump(Stat::KernelStackErr);
            0
        };

        let n = bpf_get_stack(
            ctx.as_ptr(),
            (*ev).user_ips.as_mut_ptr().cast(),
            (MAX_USER_FRAMES * 8) as u32,
            BPF_F_USER_STACK,
        );
        (*ev).user_len = if n >= 0 {
            (n as u32) / 8
        } else {
            flags |= FLAG_USER_STACK_ERR;
            bump(Stat::UserStackErr);
            0
        };
        (*ev).flags = flags;
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in the parent.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn kprof_fork(ctx: RawTracePointContext) -> i32 {
    let cfg = KPROF_CONFIG.load();
    if cfg.follow_children == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let parent_tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    let Some(parent) = TARGET_PIDS.get_ptr(parent_tgid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup.
    let slot = unsafe { (*parent).slot };
    let child: *const u8 = ctx.arg(1);
    // SAFETY: probe reads of two pid_t fields of the child's task_struct at BTF offsets; a bad
    // offset only makes the read fail or return garbage that matches no process.
    let (pid, tgid) = unsafe {
        (
            bpf_probe_read_kernel(child.add(cfg.task_pid_off as usize).cast::<i32>()),
            bpf_probe_read_kernel(child.add(cfg.task_tgid_off as usize).cast::<i32>()),
        )
    };
    let (Ok(pid), Ok(tgid)) = (pid, tgid) else {
        return 0;
    };
    // A new thread (pid ≠ tgid) is sampled through its process's entry already.
    if pid <= 0 || pid != tgid || pid as u32 == parent_tgid {
        return 0;
    }
    let value = TargetSlot { slot, inherited: 1 };
    if TARGET_PIDS.insert(&(pid as u32), &value, 0).is_ok() {
        bump(Stat::ChildrenFollowed);
    } else {
        bump(Stat::ChildrenDropped);
    }
    #[cfg(feature = "python")]
    python::inherit(parent_tgid, pid as u32);
    0
}

/// `sched_process_exec`, in the process after its `exec`: the CPython walker's view of its old
/// image is dropped at once (no walk of the new image with the old addresses).
#[cfg(feature = "python")]
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn kprof_exec(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: helper without arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    python::forget(tgid);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
