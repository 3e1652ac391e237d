//! The kernel/user-space ABI of the kprof sampler: map keys and values, the sample event and the
//! statistics counters. Every type is `#[repr(C)]`, has no `bool` and no implicit padding, and its
//! size is checked at compile time so both sides agree byte for byte.
#![no_std]

use core::mem::size_of;

pub mod python;

/// Maximum kernel frames captured per sample (the kernel's default `perf_event_max_stack`).
pub const MAX_KERNEL_FRAMES: usize = 127;
/// Maximum native user frames captured per sample.
pub const MAX_USER_FRAMES: usize = 127;

/// Capacity of the tgid → target slot map.
pub const MAX_TARGET_PIDS: u32 = 16384;
/// Capacity of the cgroup id → target slot map.
pub const MAX_TARGET_CGROUPS: u32 = 4096;
/// Default ring buffer size in bytes; the loader sizes it to CPUs × rate (`loader::ring_size`).
pub const EVENTS_RING_BYTES: u32 = 8 << 20;

/// Names of the maps and programs, used by the loader.
pub mod names {
    /// The sampler with the CPython walker.
    pub const PROG_SAMPLE: &str = "kprof_sample";
    /// The sampler without it (native and kernel stacks only).
    pub const PROG_SAMPLE_NATIVE: &str = "kprof_sample_native";
    pub const PROG_FORK: &str = "kprof_fork";
    /// Only in objects built with the CPython walker.
    pub const PROG_EXEC: &str = "kprof_exec";
    pub const MAP_TARGET_PIDS: &str = "TARGET_PIDS";
    pub const MAP_TARGET_CGROUPS: &str = "TARGET_CGROUPS";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_STATS: &str = "STATS";
    pub const GLOBAL_CONFIG: &str = "KPROF_CONFIG";
}

/// `SampleEvent::flags` bit: the kernel stack could not be read (`bpf_get_stack` failed).
pub const FLAG_KERNEL_STACK_ERR: u32 = 1;
/// `SampleEvent::flags` bit: the user stack could not be read.
pub const FLAG_USER_STACK_ERR: u32 = 1 << 1;
/// `SampleEvent::flags` bit: the sample interrupted kernel mode (kernel frames present).
pub const FLAG_IN_KERNEL: u32 = 1 << 2;

/// Counters kept per CPU in the `STATS` array (index = discriminant). Never reuse an index.
/// Program runs are not counted here: `kernel.bpf_stats_enabled` reports them (`run_cnt`) without
/// costing every untargeted tick a second map lookup.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Samples of targeted processes.
    Targeted = 0,
    /// Targeted samples lost because the ring buffer was full.
    Dropped = 1,
    /// Kernel stack reads that failed.
    KernelStackErr = 2,
    /// User stack reads that failed.
    UserStackErr = 3,
    /// Children added to the target map by the fork follower.
    ChildrenFollowed = 4,
    /// Children that could not be added (target map full).
    ChildrenDropped = 5,
}

impl Stat {
    /// Number of counters (the `STATS` array length).
    pub const COUNT: u32 = 6;
    /// All counters in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Targeted,
        Stat::Dropped,
        Stat::KernelStackErr,
        Stat::UserStackErr,
        Stat::ChildrenFollowed,
        Stat::ChildrenDropped,
    ];
}

/// Read-only configuration of the programs, set by the loader before load (a `.rodata` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Non-zero: a sample whose tgid is not targeted is also matched by cgroup id (v2).
    pub cgroup_filter: u32,
    /// Non-zero: children forked by a targeted process become targets (same slot).
    pub follow_children: u32,
    /// Byte offset of `pid` in `struct task_struct` (from kernel BTF).
    pub task_pid_off: u32,
    /// Byte offset of `tgid` in `struct task_struct` (from kernel BTF).
    pub task_tgid_off: u32,
    /// Byte offset of `self_exec_id` in `struct task_struct` (0: unknown, not read).
    pub task_exec_id_off: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 24);

/// Value of the target maps: which target (profile) a process belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetSlot {
    pub slot: u32,
    /// Non-zero when the entry was added by the fork follower (not by user space).
    pub inherited: u32,
}
const _: () = assert!(size_of::<TargetSlot>() == 8);

/// One CPU sample of a targeted thread, streamed through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleEvent {
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Target slot the process matched.
    pub slot: u32,
    /// `bpf_ktime_get_ns` at the sample.
    pub timestamp_ns: u64,
    /// Nanoseconds since the previous tick of this CPU's sampling clock: the CPU time the sample
    /// stands for (the period is jittered, see `agent/src/perf.rs`). 0 when unknown (the
    /// clock's first tick on this CPU).
    pub tick_ns: u64,
    /// cgroup v2 id of the thread (0 when unknown).
    pub cgroup_id: u64,
    /// Thread name (`comm`), NUL padded.
    pub comm: [u8; 16],
    /// Valid entries in `kernel_ips`.
    pub kernel_len: u32,
    /// Valid entries in `user_ips`.
    pub user_len: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Low 32 bits of the thread's `self_exec_id` (0 when not read): it changes when the
    /// process `exec`s, so user space knows which image a sample's addresses belong to
    /// without checking `/proc` on every drain.
    pub exec_id: u32,
    /// Kernel return addresses, innermost first.
    pub kernel_ips: [u64; MAX_KERNEL_FRAMES],
    /// User return addresses, innermost first (frame-pointer walk by the kernel).
    pub user_ips: [u64; MAX_USER_FRAMES],
    /// Python frames of the thread (count 0 for non-Python processes).
    pub py: python::PyStack,
}
const _: () = assert!(size_of::<python::PyStack>() == 8 + python::MAX_PY_FRAMES * 16);
const _: () = assert!(
    size_of::<SampleEvent>()
        == 72 + 8 * (MAX_KERNEL_FRAMES + MAX_USER_FRAMES) + size_of::<python::PyStack>()
);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], made only of integers and arrays of integers, and have no
    // padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TargetSlot {}
}
