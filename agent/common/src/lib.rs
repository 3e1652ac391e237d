//! The kernel/user-space ABI of the kprof sampler: map keys and values, the event records and
//! the statistics counters. Every type is `#[repr(C)]`, has no `bool` and no implicit padding, and its
//! size is checked at compile time so both sides agree byte for byte.
#![no_std]

use core::mem::size_of;

pub mod python;
pub mod unwind;

/// Maximum kernel frames captured per sample (the kernel's default `perf_event_max_stack`).
pub const MAX_KERNEL_FRAMES: usize = 127;
/// Maximum native user frames captured per sample.
pub const MAX_USER_FRAMES: usize = 127;

/// The page size the memory source counts in (x86-64's base page).
pub const PAGE_BYTES: u64 = 4096;

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
    /// The fork program with the CPython walker (thread creations carry Python frames).
    pub const PROG_FORK_PY: &str = "kprof_fork_py";
    /// The off-CPU source (raw tracepoint `sched_switch`), attached only when a wall or lock
    /// profile is asked for.
    pub const PROG_SWITCH: &str = "kprof_switch";
    /// The same without the CPython walker.
    pub const PROG_SWITCH_NATIVE: &str = "kprof_switch_native";
    /// `sched_process_exec`: drops the walker's and the unwinder's view of the old image.
    pub const PROG_EXEC: &str = "kprof_exec";
    /// Thread exits (raw tracepoint `sched_process_exit`), attached for threads profiles.
    pub const PROG_EXIT: &str = "kprof_exit";
    /// The memory source (perf_event, software minor page faults on every CPU, sampled),
    /// attached only when a memory profile is asked for.
    pub const PROG_FAULT: &str = "kprof_fault";
    /// The same without the CPython walker.
    pub const PROG_FAULT_NATIVE: &str = "kprof_fault_native";
    /// Memory given back, mapped or grown by targets (raw tracepoint `sys_exit`), with the
    /// memory source: releases without stacks, growth with them.
    pub const PROG_MEMSYS: &str = "kprof_memsys";
    /// The same without the CPython walker.
    pub const PROG_MEMSYS_NATIVE: &str = "kprof_memsys_native";
    /// Allocation probes (uprobes on `PyTraceMalloc_Track` and `PyTraceMalloc_Untrack`,
    /// attached per process), on demand with the memory source.
    pub const PROG_TRACK: &str = "kprof_track";
    /// The same without the CPython walker.
    pub const PROG_TRACK_NATIVE: &str = "kprof_track_native";
    pub const PROG_UNTRACK: &str = "kprof_untrack";
    pub const MAP_TARGET_PIDS: &str = "TARGET_PIDS";
    pub const MAP_TARGET_CGROUPS: &str = "TARGET_CGROUPS";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_STATS: &str = "STATS";
    /// `LruHashMap<u32 tid, OffCpuThread>`: the off-CPU state of targeted threads.
    pub const MAP_OFF_CPU: &str = "OFF_CPU";
    pub const GLOBAL_CONFIG: &str = "KPROF_CONFIG";
}

/// `EventHeader::flags` bit: the kernel stack could not be read (`bpf_get_stack` failed).
pub const FLAG_KERNEL_STACK_ERR: u32 = 1;
/// `EventHeader::flags` bit: the user stack could not be read.
pub const FLAG_USER_STACK_ERR: u32 = 1 << 1;
/// `EventHeader::flags` bit: the sample interrupted kernel mode (kernel frames present).
pub const FLAG_IN_KERNEL: u32 = 1 << 2;
/// `EventHeader::flags` bit: the walker knew the process's GIL, so `FLAG_GIL_HELD` says
/// whether the thread held it.
pub const FLAG_GIL_KNOWN: u32 = 1 << 3;
/// `EventHeader::flags` bit: the thread held the GIL.
pub const FLAG_GIL_HELD: u32 = 1 << 4;
/// `EventHeader::flags` bit: the user stack was cut where it went wrong (a return address in
/// no mapping, a stack pointer that did not grow, unreadable memory, the frame limit); its
/// outermost frames are missing.
pub const FLAG_USER_TRUNCATED: u32 = 1 << 5;
/// `EventHeader::flags` bit: an address fell outside the process's known mappings (or the
/// process had none loaded): user space should read its mappings again.
pub const FLAG_UNWIND_MISS: u32 = 1 << 6;

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
    /// Switch-outs of targeted threads (off-CPU source).
    SwitchOuts = 6,
    /// Switch-outs whose stacks were recorded (the rest are counted in `OffCpuThread::rest`).
    SwitchOutsCaptured = 7,
    /// User stacks cut where they went wrong ([`FLAG_USER_TRUNCATED`]).
    UserTruncated = 8,
    /// User stacks that met an address outside the known mappings ([`FLAG_UNWIND_MISS`]).
    UnwindMiss = 9,
    /// User frames unwound with an unwind table.
    FramesByTable = 10,
    /// User frames unwound by frame pointers (no table covers the address).
    FramesByFramePointer = 11,
    /// Sampled minor page faults of targets (memory source).
    PageFaults = 12,
    /// Mappings and heap growth of targets recorded (memory source).
    MemGrowths = 13,
    /// Allocations reported to the allocation probes, and those sampled.
    AllocsProbed = 14,
    AllocsSampled = 15,
}

impl Stat {
    /// Number of counters (the `STATS` array length).
    pub const COUNT: u32 = 16;
    /// All counters in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Targeted,
        Stat::Dropped,
        Stat::KernelStackErr,
        Stat::UserStackErr,
        Stat::ChildrenFollowed,
        Stat::ChildrenDropped,
        Stat::SwitchOuts,
        Stat::SwitchOutsCaptured,
        Stat::UserTruncated,
        Stat::UnwindMiss,
        Stat::FramesByTable,
        Stat::FramesByFramePointer,
        Stat::PageFaults,
        Stat::MemGrowths,
        Stat::AllocsProbed,
        Stat::AllocsSampled,
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
    /// Byte offset of `stack` (the kernel stack, whose top holds the user registers) in
    /// `struct task_struct` (0: unknown; off-CPU waits then carry no syscall).
    pub task_stack_off: u32,
    /// Off-CPU stack captures: a targeted thread earns one capture per `offcpu_gap_ns` of
    /// time, up to `offcpu_burst` saved (a token bucket per thread).
    pub offcpu_gap_ns: u64,
    pub offcpu_burst: u32,
    /// Non-zero: thread creations and exits of targets are recorded (threads profiles).
    pub thread_events: u32,
    /// Byte offset of `se.sum_exec_runtime` (the thread's CPU nanoseconds) in
    /// `struct task_struct` (0: unknown; thread exits then carry no CPU time).
    pub task_runtime_off: u32,
    /// Non-zero: user stacks are unwound with the `.eh_frame` tables (`unwind.rs`); zero:
    /// by the kernel's frame-pointer walk (`bpf_get_stack`).
    pub unwind_tables: u32,
    /// Allocation probes: the mean bytes between two sampled allocations (0: off).
    pub alloc_period: u64,
}
const _: () = assert!(size_of::<Config>() == 56);

/// Key of the allocation probes' map of sampled blocks: a block is known by its process and
/// address (a freed block's address is reused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampledBlock {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}
const _: () = assert!(size_of::<SampledBlock>() == 16);

/// Sampled blocks remembered in kernel until freed (beyond, the least recently sampled are
/// forgotten: their frees go unseen and user space ages them out with their process).
pub const MAX_SAMPLED_BLOCKS: u32 = 65536;

/// Value of the target maps: which target (profile) a process belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetSlot {
    pub slot: u32,
    /// Non-zero when the entry was added by the fork follower (not by user space).
    pub inherited: u32,
}
const _: () = assert!(size_of::<TargetSlot>() == 8);

/// What a record of the `EVENTS` ring buffer is ([`EventHeader::kind`]). A new profile type adds
/// a kind here, the kernel source that writes it and the user-space source that reads it.
/// Never reuse a value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A tick of the CPU sampling clock in a targeted thread; value: the nanoseconds since the
    /// previous tick of that CPU's clock (the CPU time the sample stands for; 0 when unknown,
    /// the clock's first tick). The period is jittered, see `agent/src/kernel/clock.rs`.
    CpuSample = 1,
    /// A targeted thread left the CPU and its stacks were captured (where it waits);
    /// `timestamp_ns` is the switch-out, `wait` says how it waits ([`wait`]) and `addr` the
    /// first syscall argument (a futex's address); value: 0. Its duration comes with the
    /// thread's next [`EventKind::OffCpuEnd`].
    OffCpu = 2,
    /// A thread whose captured switch-out ([`EventKind::OffCpu`]) ended: it runs again. No
    /// stacks; `timestamp_ns` is the switch-in; value: the nanoseconds it was off CPU.
    OffCpuEnd = 3,
    /// A targeted thread created a thread: recorded in the creating thread, with its stacks
    /// (who creates threads); `addr` is the new thread's id; value: 0.
    ThreadStart = 4,
    /// A thread of a target exited. No stacks; `comm` is its last name; value: the CPU
    /// nanoseconds it ran in its life (0 when unknown).
    ThreadExit = 5,
    /// A sampled minor page fault of a target: memory it touched for the first time (the
    /// kernel gave it a fresh page). `addr` is the faulting address; value: the bytes the
    /// sample stands for (the sampling period × the page size).
    PageFault = 6,
    /// A target gave memory back to the kernel ([`memsys::released`]). No stacks; `addr` is where the
    /// range starts; value: its length in bytes.
    MemRelease = 7,
    /// A target mapped new anonymous memory or grew its heap ([`memsys::added`]), with its
    /// stacks as the call returned: exact sizes of the large blocks (arenas, buffers, big
    /// arrays), not samples. `addr` is where the new memory starts; value: its length in bytes.
    MemGrow = 8,
    /// A sampled allocation a target reported through `PyTraceMalloc_Track` (NumPy's arrays,
    /// extensions that tell tracemalloc about their memory), with its stacks: allocation
    /// probes, on demand. `addr` is the block's address; value: the bytes the sample stands
    /// for (a sample point every [`Config::alloc_period`] bytes on average).
    AllocSample = 9,
    /// A sampled allocation ([`EventKind::AllocSample`]) was freed (`PyTraceMalloc_Untrack`).
    /// No stacks; `addr` is the block's address.
    AllocFree = 10,
}

impl EventKind {
    /// The kind of a record's `kind` field (`None`: a kind this agent does not know).
    pub fn from_u32(kind: u32) -> Option<EventKind> {
        match kind {
            1 => Some(EventKind::CpuSample),
            2 => Some(EventKind::OffCpu),
            3 => Some(EventKind::OffCpuEnd),
            4 => Some(EventKind::ThreadStart),
            5 => Some(EventKind::ThreadExit),
            6 => Some(EventKind::PageFault),
            7 => Some(EventKind::MemRelease),
            8 => Some(EventKind::MemGrow),
            9 => Some(EventKind::AllocSample),
            10 => Some(EventKind::AllocFree),
            _ => None,
        }
    }
}

/// The fixed head of every `EVENTS` record. The stacks follow it, packed, in this order:
/// `py_count` [`python::PyFrame`]s, `kernel_len` kernel return addresses (u64), `user_len` user
/// return addresses (u64), so a record is as long as its stacks ([`event_len`]), not
/// [`MAX_EVENT_BYTES`]. Every part is a multiple of 8 bytes, so each starts 8-aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Target slot the process matched.
    pub slot: u32,
    /// `bpf_ktime_get_ns` at the event.
    pub timestamp_ns: u64,
    /// What the event stands for, in the unit of its kind (see [`EventKind`]).
    pub value: u64,
    /// cgroup v2 id of the thread (0 when unknown).
    pub cgroup_id: u64,
    /// Off-CPU events: the first argument of the syscall the thread waits in (a futex's
    /// address); 0 otherwise.
    pub addr: u64,
    /// Thread name (`comm`), NUL padded.
    pub comm: [u8; 16],
    /// Low 32 bits of the thread's `self_exec_id` (0 when not read): it changes when the
    /// process `exec`s, so user space knows which image a record's addresses belong to
    /// without checking `/proc` on every drain.
    pub exec_id: u32,
    /// Kernel return addresses that follow, innermost first.
    pub kernel_len: u32,
    /// User return addresses that follow, innermost first (frame-pointer walk by the kernel).
    pub user_len: u32,
    /// Off-CPU events: how the thread waits ([`wait`] bits); 0 otherwise.
    pub wait: u32,
    /// Python frames that follow, innermost first (0 for non-Python processes). With
    /// `py_truncated` this is the head of a [`python::PyStack`]: the walker writes in place.
    pub py_count: u32,
    /// Non-zero when the Python chain was deeper than [`python::MAX_PY_FRAMES`].
    pub py_truncated: u32,
}
const _: () = assert!(size_of::<EventHeader>() == 96);

/// The syscalls that change a process's memory (x86-64), as seen when they return: the range
/// each gave back and the range each added. One hook at `sys_exit` sees both, with the result
/// (success, the new memory's address, the new break).
pub mod memsys {
    pub const SYS_MMAP: u64 = 9;
    pub const SYS_MUNMAP: u64 = 11;
    pub const SYS_BRK: u64 = 12;
    pub const SYS_MREMAP: u64 = 25;
    pub const SYS_MADVISE: u64 = 28;
    const MADV_DONTNEED: u64 = 4;
    const MADV_FREE: u64 = 8;
    const MADV_REMOVE: u64 = 9;
    const MADV_DONTNEED_LOCKED: u64 = 24;
    const MAP_ANONYMOUS: u64 = 0x20;
    /// Thread stacks: counted by threads profiles, not heap.
    const MAP_STACK: u64 = 0x20000;
    /// Smaller anonymous mappings are not recorded: allocators map their blocks, arenas and
    /// heaps in larger pieces (glibc from 128 KiB, pymalloc's arenas of 256 KiB or 1 MiB).
    pub const MIN_MAPPING_BYTES: u64 = 64 << 10;
    /// A `brk` that lowers the break releases what lies above it: the heap's pages are below
    /// the mappings, far from it, so this much above it is the heap's.
    pub const BRK_SPAN: u64 = 1 << 40;
    /// Results above this are `-errno`.
    const MAX_ADDRESS: u64 = (-4096i64) as u64;

    /// Whether syscall `nr` is one of these (the hook's first test, for every syscall).
    pub const fn is_memsys(nr: u64) -> bool {
        matches!(
            nr,
            SYS_MMAP | SYS_MUNMAP | SYS_BRK | SYS_MREMAP | SYS_MADVISE
        )
    }

    const fn page_up(n: u64) -> u64 {
        n.saturating_add(super::PAGE_BYTES - 1) & !(super::PAGE_BYTES - 1)
    }

    const fn failed(ret: u64) -> bool {
        ret > MAX_ADDRESS
    }

    /// The range (start, length) a call gave back, from its number, first four arguments and
    /// result; `old_break` is the process's break before a `brk` (0: unknown).
    /// `munmap(addr, len)` and `madvise(addr, len, DONTNEED|FREE|REMOVE)` that succeeded; a
    /// shrinking `mremap` (its tail) or a moved one (all it left); a `brk` that lowered the
    /// break, or any `brk` after an unknown break (what lies above the new one: nothing, if it
    /// grew).
    pub const fn released(nr: u64, args: [u64; 4], ret: u64, old_break: u64) -> Option<(u64, u64)> {
        let [a0, a1, a2, _] = args;
        if failed(ret) {
            return None;
        }
        match nr {
            SYS_MUNMAP if ret == 0 && a1 > 0 => Some((a0, a1)),
            SYS_MADVISE
                if ret == 0
                    && a1 > 0
                    && (a2 == MADV_DONTNEED
                        || a2 == MADV_FREE
                        || a2 == MADV_REMOVE
                        || a2 == MADV_DONTNEED_LOCKED) =>
            {
                Some((a0, a1))
            }
            SYS_MREMAP if ret != a0 && a1 > 0 => Some((a0, a1)),
            SYS_MREMAP if a2 < a1 => Some((a0.wrapping_add(a2), a1 - a2)),
            SYS_BRK if a0 != 0 && ret != 0 && (old_break == 0 || ret < old_break) => {
                Some((ret, BRK_SPAN))
            }
            _ => None,
        }
    }

    /// The memory (start, length) a call added, from the same. `mmap` of anonymous,
    /// accessible memory of [`MIN_MAPPING_BYTES`] or more (a `PROT_NONE` reservation is not
    /// memory yet); a growing `mremap` (its new tail, wherever the block went); a `brk` that
    /// raised a known break.
    pub const fn added(nr: u64, args: [u64; 4], ret: u64, old_break: u64) -> Option<(u64, u64)> {
        if ret == 0 || failed(ret) {
            return None;
        }
        let [a0, a1, a2, a3] = args;
        match nr {
            SYS_MMAP
                if a3 & MAP_ANONYMOUS != 0
                    && a3 & MAP_STACK == 0
                    && a2 != 0
                    && page_up(a1) >= MIN_MAPPING_BYTES =>
            {
                Some((ret, page_up(a1)))
            }
            SYS_MREMAP if page_up(a2) > page_up(a1) => {
                let grown = page_up(a2) - page_up(a1);
                if grown >= MIN_MAPPING_BYTES {
                    Some((ret.saturating_add(page_up(a1)), grown))
                } else {
                    None
                }
            }
            SYS_BRK if a0 != 0 && old_break != 0 && page_up(ret) > page_up(old_break) => {
                Some((page_up(old_break), page_up(ret) - page_up(old_break)))
            }
            _ => None,
        }
    }
}

/// How an off-CPU thread waits: the `wait` word of [`EventHeader`] and [`OffCpuThread`].
pub mod wait {
    /// Bits 0–1: the scheduler state the thread left the CPU in.
    pub const STATE_MASK: u32 = 3;
    /// Runnable: preempted or yielded, it waits for a CPU.
    pub const STATE_RUNNABLE: u32 = 0;
    /// Interruptible sleep (`S`): waits for an event (I/O, a futex, a timer).
    pub const STATE_SLEEPING: u32 = 1;
    /// Uninterruptible sleep (`D`): usually disk I/O.
    pub const STATE_DISK: u32 = 2;
    /// The thread was in a syscall: bits 16–31 hold its number.
    pub const IN_SYSCALL: u32 = 1 << 2;
    pub const SYSCALL_SHIFT: u32 = 16;
    /// x86-64 `futex(2)`.
    pub const SYS_FUTEX: u32 = 202;

    /// The wait word of a thread that left the CPU in `prev_state` (the kernel's task state
    /// bits), in syscall `nr` (`None`: not in a syscall).
    pub const fn of(prev_state: u32, nr: Option<u32>) -> u32 {
        of_raw(
            prev_state,
            match nr {
                Some(n) => n,
                None => NO_SYSCALL,
            },
        )
    }

    /// [`of`] with [`NO_SYSCALL`] for "not in a syscall" (what the kernel side calls: an
    /// `Option`'s undefined payload can reach the verifier as a pointer).
    pub const fn of_raw(prev_state: u32, nr: u32) -> u32 {
        let state = if prev_state & 2 != 0 {
            STATE_DISK
        } else if prev_state & 1 != 0 {
            STATE_SLEEPING
        } else {
            STATE_RUNNABLE
        };
        let mut w = state;
        if nr < 0x10000 {
            w |= IN_SYSCALL | (nr << SYSCALL_SHIFT);
        }
        w
    }

    /// The syscall number [`of_raw`] takes for "none".
    pub const NO_SYSCALL: u32 = u32::MAX;

    /// The syscall number of a wait word, if the thread was in one.
    pub const fn syscall(w: u32) -> Option<u32> {
        if w & IN_SYSCALL != 0 {
            Some(w >> SYSCALL_SHIFT)
        } else {
            None
        }
    }

    /// Which of [`super::OffCpuThread::rest_ns`] an uncaptured wait is added to: the strata
    /// user space shares their time out in (runnable, futex, other sleep, disk).
    pub const fn stratum(w: u32) -> usize {
        match w & STATE_MASK {
            STATE_RUNNABLE => 0,
            STATE_DISK => 3,
            _ => match syscall(w) {
                Some(SYS_FUTEX) => 1,
                _ => 2,
            },
        }
    }
    /// Number of strata.
    pub const STRATA: usize = 4;
}

/// Capacity of the `OFF_CPU` map (targeted threads tracked at once; least recently switched
/// ones are evicted first).
pub const MAX_OFF_CPU_THREADS: u32 = 32768;

/// Value of the `OFF_CPU` map: one targeted thread's off-CPU state, kept by thread id so it
/// survives the thread moving between CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuThread {
    /// `bpf_ktime_get_ns` of the switch-out the thread is off CPU since (0: it runs).
    pub ts_out: u64,
    /// When capture credit was last earned (see [`Config::offcpu_gap_ns`]).
    pub credit_at: u64,
    /// Capture credit in nanoseconds per [`wait::stratum`] (at most gap × burst, which fits
    /// 32 bits): a burst of one kind of switch-out (preemptions, say) must not use up the
    /// credit of the others, or the waits it precedes go uncaptured every time and their time
    /// is shared out over other waits of their stratum (a timed sleep read as I/O).
    pub credit_ns: [u32; wait::STRATA],
    /// The current wait's first syscall argument (see [`EventHeader::addr`]).
    pub addr: u64,
    /// Nanoseconds and count of the waits whose stacks were not captured, by
    /// [`wait::stratum`]; they only grow (user space reads differences).
    pub rest_ns: [u64; wait::STRATA],
    pub rest_count: [u64; wait::STRATA],
    pub tgid: u32,
    /// The current wait's [`wait`] word.
    pub wait: u32,
    /// Non-zero when the current wait's switch-out was captured (an `OffCpu` record).
    pub captured: u32,
    /// The target slot of the thread's process.
    pub slot: u32,
}
const _: () = assert!(size_of::<OffCpuThread>() == 120);

/// The largest record: a header with every stack full.
pub const MAX_EVENT_BYTES: usize = size_of::<EventHeader>()
    + python::MAX_PY_FRAMES * size_of::<python::PyFrame>()
    + 8 * (MAX_KERNEL_FRAMES + MAX_USER_FRAMES);

/// The kernel's per-CPU assembly buffer for one record (the `EVENT_BUF` map): the header, then
/// room for every stack at its largest. The walker writes a [`python::PyStack`] in place at
/// `header.py_count` (the stack's `count` and `truncated` are the header's last two fields and
/// its frames follow the header); the native stacks are then written right after the Python
/// frames actually found, and the first [`event_len`] bytes are the record.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EventBuf {
    pub header: EventHeader,
    pub py_frames: [python::PyFrame; python::MAX_PY_FRAMES],
    pub ips: [u64; MAX_KERNEL_FRAMES + MAX_USER_FRAMES],
}
const _: () = assert!(size_of::<EventBuf>() == MAX_EVENT_BYTES);
const _: () = assert!(
    core::mem::offset_of!(EventHeader, py_count) + 8 == size_of::<EventHeader>()
        && core::mem::offset_of!(EventHeader, py_truncated)
            == core::mem::offset_of!(EventHeader, py_count) + 4
        && core::mem::offset_of!(python::PyStack, frames) == 8
        && core::mem::offset_of!(EventBuf, py_frames) == size_of::<EventHeader>()
);

/// The length of a record with these stacks (counts beyond the maxima are clamped).
pub const fn event_len(py_count: usize, kernel_len: usize, user_len: usize) -> usize {
    let py = if py_count < python::MAX_PY_FRAMES {
        py_count
    } else {
        python::MAX_PY_FRAMES
    };
    let k = if kernel_len < MAX_KERNEL_FRAMES {
        kernel_len
    } else {
        MAX_KERNEL_FRAMES
    };
    let u = if user_len < MAX_USER_FRAMES {
        user_len
    } else {
        MAX_USER_FRAMES
    };
    size_of::<EventHeader>() + py * size_of::<python::PyFrame>() + 8 * (k + u)
}
const _: () = assert!(event_len(usize::MAX, usize::MAX, usize::MAX) == MAX_EVENT_BYTES);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], made only of integers and arrays of integers, and have no
    // padding (checked by the size assertions above).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TargetSlot {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::OffCpuThread {}
}

#[cfg(test)]
mod memsys_tests {
    use super::memsys::{
        BRK_SPAN, MIN_MAPPING_BYTES, SYS_BRK, SYS_MADVISE, SYS_MMAP, SYS_MREMAP, SYS_MUNMAP, added,
        released,
    };

    const ANON: u64 = 0x20 | 0x02; // MAP_ANONYMOUS | MAP_PRIVATE
    const RW: u64 = 3;
    const ENOMEM: u64 = -12i64 as u64;

    #[test]
    fn large_anonymous_mappings_and_heap_growth_are_memory_added() {
        let at = 0x7f00_0000_0000;
        assert_eq!(
            added(SYS_MMAP, [0, 1 << 20, RW, ANON], at, 0),
            Some((at, 1 << 20))
        );
        // Rounded up to pages.
        assert_eq!(
            added(SYS_MMAP, [0, (1 << 20) + 1, RW, ANON], at, 0),
            Some((at, (1 << 20) + 4096))
        );
        // Small, file-backed, a PROT_NONE reservation, a thread stack, a failed call: not.
        assert_eq!(
            added(SYS_MMAP, [0, MIN_MAPPING_BYTES - 4096, RW, ANON], at, 0),
            None
        );
        assert_eq!(added(SYS_MMAP, [0, 1 << 20, RW, 0x02], at, 0), None);
        assert_eq!(added(SYS_MMAP, [0, 1 << 20, 0, ANON], at, 0), None);
        assert_eq!(
            added(SYS_MMAP, [0, 1 << 20, RW, ANON | 0x20000], at, 0),
            None
        );
        assert_eq!(added(SYS_MMAP, [0, 1 << 20, RW, ANON], ENOMEM, 0), None);
        // mremap: the grown tail, wherever the block moved to.
        assert_eq!(
            added(SYS_MREMAP, [at, 1 << 20, 2 << 20, 1], at + (8 << 20), 0),
            Some((at + (9 << 20), 1 << 20))
        );
        assert_eq!(added(SYS_MREMAP, [at, 2 << 20, 1 << 20, 0], at, 0), None);
        // brk: from the old break up to the new one; not when it fell, is unknown, or asked.
        let heap = 0x5555_0000_0000;
        assert_eq!(
            added(SYS_BRK, [heap + 0x21000, 0, 0, 0], heap + 0x21000, heap),
            Some((heap, 0x21000))
        );
        assert_eq!(added(SYS_BRK, [heap, 0, 0, 0], heap, heap + 0x21000), None);
        assert_eq!(
            added(SYS_BRK, [heap + 0x21000, 0, 0, 0], heap + 0x21000, 0),
            None
        );
        assert_eq!(added(SYS_BRK, [0, 0, 0, 0], heap + 0x21000, heap), None);
    }

    #[test]
    fn memory_given_back_is_what_succeeded() {
        let at = 0x7f00_0000_0000;
        assert_eq!(
            released(SYS_MUNMAP, [at, 1 << 20, 0, 0], 0, 0),
            Some((at, 1 << 20))
        );
        assert_eq!(released(SYS_MUNMAP, [at, 1 << 20, 0, 0], ENOMEM, 0), None);
        assert_eq!(
            released(SYS_MADVISE, [at, 8192, 4, 0], 0, 0),
            Some((at, 8192))
        );
        // MADV_WILLNEED gives nothing back.
        assert_eq!(released(SYS_MADVISE, [at, 8192, 3, 0], 0, 0), None);
        // mremap shrinking in place: its tail; moved: all of the old block.
        assert_eq!(
            released(SYS_MREMAP, [at, 2 << 20, 1 << 20, 0], at, 0),
            Some((at + (1 << 20), 1 << 20))
        );
        assert_eq!(
            released(SYS_MREMAP, [at, 1 << 20, 2 << 20, 1], at + (8 << 20), 0),
            Some((at, 1 << 20))
        );
        assert_eq!(released(SYS_MREMAP, [at, 1 << 20, 2 << 20, 1], at, 0), None);
        // brk: lowered, or after an unknown break; not raised from a known one, not a query.
        let heap = 0x5555_0000_0000;
        assert_eq!(
            released(SYS_BRK, [heap, 0, 0, 0], heap, heap + 0x21000),
            Some((heap, BRK_SPAN))
        );
        assert_eq!(
            released(SYS_BRK, [heap + 0x21000, 0, 0, 0], heap + 0x21000, 0),
            Some((heap + 0x21000, BRK_SPAN))
        );
        assert_eq!(
            released(SYS_BRK, [heap + 0x21000, 0, 0, 0], heap + 0x21000, heap),
            None
        );
        assert_eq!(released(SYS_BRK, [0, 0, 0, 0], heap, heap + 0x21000), None);
    }
}
