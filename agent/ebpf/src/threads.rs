//! Thread lifecycle of targets, for threads profiles: a creation is recorded in the creating
//! thread (`sched_process_fork` runs in the parent), so its Python and native stacks say who
//! creates threads; an exit is a header-only record with the thread's CPU time, so user space
//! knows the exact life of threads too short to be seen in `/proc`.
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel,
    helpers::generated::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
    },
};
use kprof_common::{Config, EventKind};

use crate::{
    KPROF_CONFIG,
    maps::target_slot,
    record::{self, Event},
};

/// The current thread of a target created thread `child`.
#[inline(always)]
pub fn on_thread_start<C: EbpfContext, const PYTHON: bool>(
    ctx: &C,
    pid_tgid: u64,
    child: u32,
    slot: u32,
    cfg: &Config,
) {
    let ev = Event {
        kind: EventKind::ThreadStart,
        value: 0,
        // SAFETY: helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
        slot,
        in_kernel: true,
        kernel_stack: false,
        wait: 0,
        addr: u64::from(child),
        user_regs_set: false,
    };
    record::submit::<_, PYTHON>(ctx, &ev, cfg, record::BUF_TASK);
}

/// `sched_process_exit(struct task_struct *p, ...)`, in the exiting thread.
#[inline(always)]
pub fn on_exit() -> i32 {
    let cfg = KPROF_CONFIG.load();
    if cfg.thread_events == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    let mut h = record::header(EventKind::ThreadExit, pid_tgid, slot);
    // SAFETY: a helper writing into the header on the stack; a probe read of one u64 of the
    // current task at its BTF offset (a bad offset only makes the read fail).
    unsafe {
        bpf_get_current_comm(h.comm.as_mut_ptr().cast(), 16);
        if cfg.task_runtime_off != 0 {
            let task = bpf_get_current_task() as *const u8;
            h.value = bpf_probe_read_kernel(task.add(cfg.task_runtime_off as usize).cast::<u64>())
                .unwrap_or(0);
        }
    }
    record::submit_header(&h);
    0
}
