//! The maps every program shares: which processes are targets, the event ring, the per-CPU
//! record buffer and the counters.
use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id,
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use kprof_common::{
    Config, EVENTS_RING_BYTES, EventBuf, MAX_TARGET_CGROUPS, MAX_TARGET_PIDS, Stat, TargetSlot,
};

#[map(name = "TARGET_PIDS")]
pub static TARGET_PIDS: HashMap<u32, TargetSlot> = HashMap::with_max_entries(MAX_TARGET_PIDS, 0);

#[map(name = "TARGET_CGROUPS")]
pub static TARGET_CGROUPS: HashMap<u64, TargetSlot> =
    HashMap::with_max_entries(MAX_TARGET_CGROUPS, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Per CPU, one record being assembled per source (`record.rs`, `BUF_*`): a program is not
/// re-entered on its CPU, but one source could interrupt another's (the scheduler tracepoint
/// runs with interrupts off today; a slot each keeps that from mattering).
#[map(name = "EVENT_BUF")]
pub static EVENT_BUF: PerCpuArray<EventBuf> = PerCpuArray::with_max_entries(5, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, the program is not re-entered on the same CPU.
        unsafe { *counter += 1 };
    }
}

/// The target slot of the current process: by tgid, else (when enabled) by cgroup.
#[inline(always)]
pub fn target_slot(tgid: u32, cfg: &Config) -> Option<u32> {
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
