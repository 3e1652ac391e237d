//! Allocation probes, on demand (memory profiles): uprobes on CPython's
//! `PyTraceMalloc_Track(domain, ptr, size)` and `PyTraceMalloc_Untrack(domain, ptr)`, which
//! NumPy and other extensions call for every block they allocate and free, attached by user
//! space to the processes that asked for them. Allocations are sampled by bytes: a sample point
//! falls every `alloc_period` bytes on average (each gap drawn afresh, uniformly from one to
//! twice the period less one, so that a periodic allocation pattern does not line up with
//! them), and an allocation holding `n` sample points is recorded once, with its stacks,
//! standing for `n × period` bytes: each function's bytes, summed, are unbiased. A sampled block is remembered until it is freed (`SAMPLED`), when a
//! header-only record says so.
use aya_ebpf::{
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::ProbeContext,
};
use kprof_common::{EventHeader, EventKind, MAX_SAMPLED_BLOCKS, SampledBlock, Stat};

use crate::{
    KPROF_CONFIG,
    maps::{bump, target_slot},
    record::{self, Event},
    unwind,
};

/// Per CPU: bytes left until the next sample point (a CPU's allocations, whichever thread
/// makes them, share one sequence of points: the expected samples of an allocation are its
/// bytes over the period all the same).
#[map(name = "ALLOC_COUNTDOWN")]
static ALLOC_COUNTDOWN: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Sampled blocks not freed yet.
#[map(name = "SAMPLED")]
static SAMPLED: LruHashMap<SampledBlock, u8> = LruHashMap::with_max_entries(MAX_SAMPLED_BLOCKS, 0);

/// Sample points of one allocation drawn one by one at most (the rest are counted).
const MAX_DRAWN_POINTS: u32 = 16;

/// The gap to the next sample point: uniform in [1, 2 × period).
#[inline(always)]
fn gap(period: i64) -> i64 {
    // SAFETY: helper without arguments.
    let r = u64::from(unsafe { bpf_get_prandom_u32() });
    // Unsigned: BPF has no signed division.
    (1 + ((r * (2 * period as u64 - 1)) >> 32)) as i64
}

/// `PyTraceMalloc_Track(unsigned int domain, uintptr_t ptr, size_t size)`.
#[inline(always)]
pub fn on_track<const PYTHON: bool>(ctx: &ProbeContext) -> u32 {
    let cfg = KPROF_CONFIG.load();
    let period = cfg.alloc_period.min(1 << 40) as i64;
    if period <= 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    bump(Stat::AllocsProbed);
    let ptr: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    if ptr == 0 || size == 0 {
        return 0;
    }
    let Some(left) = ALLOC_COUNTDOWN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's counter; bounded arithmetic (sizes above 2^40 are clamped).
    let points = unsafe {
        let size = size.min(1 << 40) as i64;
        if *left <= 0 || *left > 2 * period {
            // First use on this CPU, or the period changed.
            *left = gap(period);
        }
        *left -= size;
        if *left > 0 {
            return 0;
        }
        // Each point is followed by a fresh random gap (a gap carried over would make the
        // points periodic, and a periodic allocation pattern would line up with them). The
        // points of a block many periods long are counted, past the first few, by its length.
        let mut points = 0i64;
        for _ in 0..MAX_DRAWN_POINTS {
            if *left > 0 {
                break;
            }
            points += 1;
            *left += gap(period);
        }
        if *left <= 0 {
            points += 1 + ((-*left) as u64 / period as u64) as i64;
            *left = gap(period);
        }
        points
    };
    bump(Stat::AllocsSampled);
    let block = SampledBlock {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    let _ = SAMPLED.insert(&block, &1, 0);
    // SAFETY: the probe's registers are the caller's user registers at the function's entry.
    let (ip, sp, bp) = unsafe {
        let r = &*ctx.regs;
        (r.rip, r.rsp, r.rbp)
    };
    let ev = Event {
        kind: EventKind::AllocSample,
        value: points as u64 * period as u64,
        // SAFETY: helper without arguments.
        now: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
        slot,
        in_kernel: false,
        kernel_stack: false,
        wait: 0,
        addr: ptr,
        user_regs_set: unwind::start_from(record::BUF_PROBE, ip, sp, bp),
    };
    record::submit::<_, PYTHON>(ctx, &ev, &cfg, record::BUF_PROBE);
    0
}

/// `PyTraceMalloc_Untrack(unsigned int domain, uintptr_t ptr)`: a sampled block freed.
#[inline(always)]
pub fn on_untrack(ctx: &ProbeContext) -> u32 {
    // SAFETY: helper without arguments.
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let tgid = (pid_tgid >> 32) as u32;
    let ptr: u64 = ctx.arg(1).unwrap_or(0);
    let block = SampledBlock {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    // SAFETY: only the presence of the entry is read.
    if unsafe { SAMPLED.get(&block) }.is_none() {
        return 0;
    }
    let _ = SAMPLED.remove(&block);
    let cfg = KPROF_CONFIG.load();
    let Some(slot) = target_slot(tgid, &cfg) else {
        return 0;
    };
    record::submit_header(&EventHeader {
        addr: ptr,
        ..record::header(EventKind::AllocFree, pid_tgid, slot)
    });
    0
}
