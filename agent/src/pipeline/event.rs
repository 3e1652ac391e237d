//! The one event model of the pipeline: what a kernel event is, the value it carries and its
//! stacks. Every event source decodes into an [`Event`]; aggregation and windows only see
//! this type.
use kprof_common::{FLAG_IN_KERNEL, SampleEvent, python::PyStack};

use crate::profile::ProfileKind;

/// What an event is. Adding a profile type adds a kind here, its kernel and user-space
/// sources, and the [`ProfileKind`] its values are reported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A tick of the CPU sampling clock in a targeted thread; value: the CPU nanoseconds the
    /// sample stands for.
    CpuSample,
    /// A thread that was off CPU; value: the nanoseconds it was off. (No kernel source yet.)
    OffCpu,
}

impl EventKind {
    /// The profile kind this event's values are reported in. `sample_hz` is the rate of the CPU
    /// sampler (CPU samples only).
    pub fn profile_kind(self, sample_hz: u32) -> ProfileKind {
        match self {
            EventKind::CpuSample => ProfileKind::Cpu { sample_hz },
            EventKind::OffCpu => ProfileKind::OffCpu,
        }
    }
}

/// One decoded event (borrowed from the record it was read from).
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub kind: EventKind,
    /// A count, nanoseconds or bytes, by kind.
    pub value: u64,
    pub tgid: u32,
    pub tid: u32,
    /// The target slot the process matched in kernel.
    pub slot: u32,
    /// Thread name (`comm`), NUL padded.
    pub comm: [u8; 16],
    /// Low bits of the thread's `self_exec_id` (0: not read).
    pub exec_id: u32,
    /// The event interrupted kernel mode.
    pub in_kernel: bool,
    /// Kernel return addresses, innermost first.
    pub kernel: &'a [u64],
    /// User return addresses, innermost first.
    pub user: &'a [u64],
    pub py: &'a PyStack,
}

impl<'a> Event<'a> {
    /// The event of one CPU sample record taken at a nominal period of `period_ns`.
    pub fn cpu_sample(ev: &'a SampleEvent, period_ns: u64) -> Self {
        let k = (ev.kernel_len as usize).min(ev.kernel_ips.len());
        let u = (ev.user_len as usize).min(ev.user_ips.len());
        Event {
            kind: EventKind::CpuSample,
            value: sample_cpu_ns(ev.tick_ns, period_ns),
            tgid: ev.tgid,
            tid: ev.tid,
            slot: ev.slot,
            comm: ev.comm,
            exec_id: ev.exec_id,
            in_kernel: ev.flags & FLAG_IN_KERNEL != 0,
            kernel: &ev.kernel_ips[..k],
            user: &ev.user_ips[..u],
            py: &ev.py,
        }
    }

    /// The Python frames that were captured.
    pub fn py_frames(&self) -> &'a [kprof_common::python::PyFrame] {
        let n = (self.py.count as usize).min(self.py.frames.len());
        &self.py.frames[..n]
    }
}

/// The CPU nanoseconds one sample stands for: the measured interval since its CPU's previous
/// clock tick (the period is jittered, `perf.rs`), or the nominal period where that is unknown
/// (the clock's first tick) or not believable (longer than a re-armed clock can take: 1½ + 1½
/// periods, with slack).
pub fn sample_cpu_ns(tick_ns: u64, nominal_period_ns: u64) -> u64 {
    if tick_ns == 0 || tick_ns > nominal_period_ns.saturating_mul(4) {
        nominal_period_ns
    } else {
        tick_ns
    }
}

impl Event<'static> {
    /// A synthetic event of thread `worker` of `pid` with native frames only (for tests of the
    /// pipeline without a kernel).
    pub fn synthetic(kind: EventKind, value: u64, pid: u32, user: &'static [u64]) -> Self {
        Event {
            kind,
            value,
            tgid: pid,
            tid: pid,
            slot: 0,
            comm: *b"worker\0\0\0\0\0\0\0\0\0\0",
            exec_id: 0,
            in_kernel: false,
            kernel: &[],
            user,
            py: &PyStack::EMPTY,
        }
    }
}

/// Copies a CPU sample record out of the ring buffer (`None` when it is too short, which the
/// kernel never writes).
pub fn read_cpu_sample(bytes: &[u8]) -> Option<SampleEvent> {
    if bytes.len() < size_of::<SampleEvent>() {
        return None;
    }
    // SAFETY: the record holds a whole `SampleEvent` written by the eBPF program (a
    // plain-integer `#[repr(C)]` type, valid for any bits); read_unaligned copies it out of
    // the ring.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// A NUL-padded `comm` as a string.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_sample_record_decodes_to_its_used_frames() {
        // SAFETY: SampleEvent is plain integers; all-zero is a valid value.
        let mut ev: Box<SampleEvent> = Box::new(unsafe { std::mem::zeroed() });
        ev.tgid = 7;
        ev.user_len = 2;
        ev.user_ips[..2].copy_from_slice(&[0x10, 0x20]);
        ev.kernel_len = 500; // never trusted beyond the array
        ev.flags = FLAG_IN_KERNEL;
        let bytes: &[u8] = bytemuck_bytes(&ev);
        let copy = read_cpu_sample(bytes).unwrap();
        let e = Event::cpu_sample(&copy, 10_101_010);
        assert_eq!(
            (e.kind, e.value, e.tgid),
            (EventKind::CpuSample, 10_101_010, 7)
        );
        assert_eq!(e.user, [0x10, 0x20]);
        assert_eq!(e.kernel.len(), kprof_common::MAX_KERNEL_FRAMES);
        assert!(e.in_kernel);
        assert!(e.py_frames().is_empty());
        assert!(read_cpu_sample(&bytes[..16]).is_none());
        // A measured tick interval is the value; an unknown or impossible one is the period.
        let mut ticked = copy;
        ticked.tick_ns = 14_000_000;
        assert_eq!(Event::cpu_sample(&ticked, 10_101_010).value, 14_000_000);
        ticked.tick_ns = 1_000_000_000;
        assert_eq!(Event::cpu_sample(&ticked, 10_101_010).value, 10_101_010);
        assert_eq!(comm_str(b"py\0\0"), "py");
    }

    fn bytemuck_bytes(ev: &SampleEvent) -> &[u8] {
        // SAFETY: a plain-integer struct without padding viewed as bytes.
        unsafe {
            std::slice::from_raw_parts((ev as *const SampleEvent).cast(), size_of::<SampleEvent>())
        }
    }
}
