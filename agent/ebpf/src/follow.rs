//! Following processes: children of a targeted process inherit its target slot (and a Python
//! parent's walker configuration), and an `exec` drops the walker's view of the old image.
use aya_ebpf::{
    helpers::bpf_probe_read_kernel, helpers::generated::bpf_get_current_pid_tgid,
    programs::RawTracePointContext,
};
use kprof_common::{Stat, TargetSlot};

use crate::{
    KPROF_CONFIG,
    maps::{TARGET_PIDS, bump, target_slot},
};

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in the parent:
/// the child's pid and tgid are read from its `task_struct` at offsets user space took from
/// kernel BTF. A new thread of a target is recorded for threads profiles (`threads.rs`).
#[inline(always)]
pub fn on_fork<const PYTHON: bool>(ctx: &RawTracePointContext) -> i32 {
    let cfg = KPROF_CONFIG.load();
    if cfg.follow_children == 0 && cfg.thread_events == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let parent_tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = target_slot(parent_tgid, &cfg) else {
        return 0;
    };
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
    if pid <= 0 {
        return 0;
    }
    // A new thread (pid ≠ tgid) is sampled through its process's entry already.
    if pid != tgid || pid as u32 == parent_tgid {
        if tgid as u32 == parent_tgid && cfg.thread_events != 0 {
            crate::threads::on_thread_start::<_, PYTHON>(ctx, pid_tgid, pid as u32, slot, &cfg);
        }
        return 0;
    }
    // Only processes targeted by pid have their children followed.
    if cfg.follow_children == 0 || TARGET_PIDS.get_ptr(parent_tgid).is_none() {
        return 0;
    }
    let value = TargetSlot { slot, inherited: 1 };
    if TARGET_PIDS.insert(&(pid as u32), &value, 0).is_ok() {
        bump(Stat::ChildrenFollowed);
    } else {
        bump(Stat::ChildrenDropped);
    }
    #[cfg(feature = "python")]
    crate::python::inherit(parent_tgid, pid as u32);
    0
}

/// `sched_process_exec`, in the process after its `exec`: the CPython walker's view and the
/// unwinder's mappings of its old image are dropped at once (no walk of the new image with the
/// old addresses; its stacks are walked by frame pointers until user space has read the new
/// mappings, which the flag on them asks for).
#[inline(always)]
pub fn on_exec() -> i32 {
    // SAFETY: helper without arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    #[cfg(feature = "python")]
    crate::python::forget(tgid);
    let _ = crate::unwind::UNWIND_PROCS.remove(&tgid);
    0
}
