//! kprof eBPF programs: the entry points. Each event source is a module; every source that
//! records stacks goes through `record::submit`, the one path that fills the header, collects
//! the Python, kernel and user stacks and writes the record.
//!
//! - `kprof_sample` (perf_event, software cpu-clock on every CPU, period jittered by user space):
//!   the CPU source (`cpu.rs`).
//! - `kprof_fork` (raw tracepoint `sched_process_fork`): children of a targeted process inherit
//!   its target slot, so short-lived children are profiled from their first tick (`follow.rs`).
//!   A raw tracepoint needs no tracefs (not mounted in pods).
//! - `kprof_switch` (raw tracepoint `sched_switch`, attached for wall and lock profiles): the
//!   off-CPU source (`offcpu.rs`).
//! - `kprof_fork` also records thread creations (with the creating thread's stacks) and
//!   `kprof_exit` (raw tracepoint `sched_process_exit`) thread exits, for threads profiles
//!   (`threads.rs`).
//! - `kprof_fault` (perf_event, software minor page faults on every CPU, sampled) and
//!   `kprof_memsys` (raw tracepoint `sys_exit`: memory given back, mapped or grown), attached
//!   for memory profiles: the memory source (`memory.rs`).
//! - `kprof_track` and `kprof_untrack` (uprobes on `PyTraceMalloc_Track`/`_Untrack`, attached
//!   by user space to the processes that ask for allocation probes): sampled allocations
//!   (`alloc.rs`).
//! - `kprof_exec` (raw tracepoint `sched_process_exec`, with the walker): drops the walker's
//!   configuration of a process that replaced its image (`follow.rs`).
#![no_std]
#![no_main]

mod alloc;
mod cpu;
mod follow;
mod maps;
mod memory;
mod offcpu;
#[cfg(feature = "python")]
mod python;
mod record;
mod threads;
mod unwind;

use aya_ebpf::{
    Global,
    macros::{perf_event, raw_tracepoint, uprobe},
    programs::{PerfEventContext, ProbeContext, RawTracePointContext},
};
use kprof_common::Config;

/// Set by the loader (`EbpfLoader::override_global`); non-zero defaults keep it in `.rodata`.
#[unsafe(no_mangle)]
static KPROF_CONFIG: Global<Config> = Global::new(Config {
    cgroup_filter: 0,
    follow_children: 1,
    task_pid_off: 1,
    task_tgid_off: 1,
    task_exec_id_off: 0,
    task_stack_off: 0,
    offcpu_gap_ns: 1,
    offcpu_burst: 1,
    thread_events: 0,
    task_runtime_off: 0,
    unwind_tables: 0,
    alloc_period: 0,
});

/// The CPU sampler with the CPython walker (the default).
#[perf_event]
pub fn kprof_sample(ctx: PerfEventContext) -> u32 {
    cpu::on_tick::<true>(&ctx)
}

/// The same sampler without the CPython walker: loaded with `--no-python`, or when the kernel
/// rejects the walker, so native and kernel stacks always work.
#[perf_event]
pub fn kprof_sample_native(ctx: PerfEventContext) -> u32 {
    cpu::on_tick::<false>(&ctx)
}

/// The memory source with the CPython walker.
#[perf_event]
pub fn kprof_fault(ctx: PerfEventContext) -> u32 {
    memory::on_fault::<true>(&ctx)
}

/// The memory source without it (paired with `kprof_sample_native`).
#[perf_event]
pub fn kprof_fault_native(ctx: PerfEventContext) -> u32 {
    memory::on_fault::<false>(&ctx)
}

/// Memory given back, mapped or grown by targets (memory profiles).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn kprof_memsys(ctx: RawTracePointContext) -> i32 {
    memory::on_syscall_exit::<true>(&ctx)
}

/// The same without the CPython walker (paired with `kprof_sample_native`).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn kprof_memsys_native(ctx: RawTracePointContext) -> i32 {
    memory::on_syscall_exit::<false>(&ctx)
}

/// Allocation probes with the CPython walker: `PyTraceMalloc_Track`, sampled by bytes.
#[uprobe]
pub fn kprof_track(ctx: ProbeContext) -> u32 {
    alloc::on_track::<true>(&ctx)
}

/// The same without the CPython walker.
#[uprobe]
pub fn kprof_track_native(ctx: ProbeContext) -> u32 {
    alloc::on_track::<false>(&ctx)
}

/// `PyTraceMalloc_Untrack`: a sampled block freed.
#[uprobe]
pub fn kprof_untrack(ctx: ProbeContext) -> u32 {
    alloc::on_untrack(&ctx)
}

/// The off-CPU source with the CPython walker.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn kprof_switch(ctx: RawTracePointContext) -> i32 {
    offcpu::on_switch::<true>(&ctx)
}

/// The off-CPU source without it (paired with `kprof_sample_native`).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn kprof_switch_native(ctx: RawTracePointContext) -> i32 {
    offcpu::on_switch::<false>(&ctx)
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn kprof_fork(ctx: RawTracePointContext) -> i32 {
    follow::on_fork::<false>(&ctx)
}

/// Thread creation with the CPython walker (`kprof_fork` without it, in a native-only load).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn kprof_fork_py(ctx: RawTracePointContext) -> i32 {
    follow::on_fork::<true>(&ctx)
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn kprof_exit(_ctx: RawTracePointContext) -> i32 {
    threads::on_exit()
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn kprof_exec(_ctx: RawTracePointContext) -> i32 {
    follow::on_exec()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
