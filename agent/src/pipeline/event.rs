//! The one event model of the pipeline: what a kernel event is, the value it carries and its
//! stacks. Every event source decodes into an [`Event`]; aggregation and windows only see
//! this type.
pub use kprof_common::EventKind;
use kprof_common::{
    EventHeader, FLAG_GIL_HELD, FLAG_GIL_KNOWN, FLAG_IN_KERNEL, FLAG_UNWIND_MISS,
    FLAG_USER_TRUNCATED, MAX_KERNEL_FRAMES, MAX_USER_FRAMES,
    python::{MAX_PY_FRAMES, PyFrame, PyFrames},
};

/// One decoded event (borrowed from the record it was read from). Which profiles an event
/// feeds is the profile kind's rule (`ProfileKind::takes`); adding a profile type adds its
/// [`EventKind`] (in `kprof-common`, the kernel's and user space's one definition), its
/// kernel and user-space sources, and its profile kind.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub kind: EventKind,
    /// A count, nanoseconds or bytes, by kind.
    pub value: u64,
    /// How many occurrences the event stands for: 1 for a kernel record; a part of an off-CPU
    /// interval reported before it ended counts 0 (the interval is counted once).
    pub count: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the event.
    pub timestamp_ns: u64,
    /// Off-CPU events: the wait word (`kprof_common::wait`) and the syscall's first argument.
    pub wait: u32,
    pub addr: u64,
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
    /// Python threads of a process whose GIL is known: whether the thread held it.
    pub gil_held: Option<bool>,
    /// Kernel return addresses, innermost first.
    pub kernel: &'a [u64],
    /// User return addresses, innermost first.
    pub user: &'a [u64],
    /// The user stack was cut where it went wrong (its outermost frames are missing).
    pub user_truncated: bool,
    /// An address was outside the process's known mappings: they should be read again.
    pub unwind_miss: bool,
    pub py: PyFrames<'a>,
}

/// The CPU nanoseconds one sample stands for: the measured interval since its CPU's previous
/// clock tick (the period is jittered, `kernel/clock.rs`), or the nominal period where that is unknown
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
            count: 1,
            timestamp_ns: 0,
            wait: 0,
            addr: 0,
            tgid: pid,
            tid: pid,
            slot: 0,
            comm: *b"worker\0\0\0\0\0\0\0\0\0\0",
            exec_id: 0,
            in_kernel: false,
            user_truncated: false,
            unwind_miss: false,
            gil_held: None,
            kernel: &[],
            user,
            py: PyFrames::default(),
        }
    }
}

/// Why a ring-buffer record could not be decoded (the kernel writes none of these; each is
/// counted, never trusted).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record of unknown kind {0}")]
    UnknownKind(u32),
    #[error("record of {len} bytes does not hold the {want} its stack counts say")]
    Lengths { len: usize, want: usize },
}

/// Decodes ring-buffer records into [`Event`]s. A record is copied into a reused 8-aligned
/// buffer (the ring is read while the kernel writes on, and its records need not stay put), so
/// the stacks are slices of it: no allocation per event.
#[derive(Debug, Default)]
pub struct Decoder {
    words: Vec<u64>,
}

impl Decoder {
    /// The event of one record. CPU samples take `cpu_period_ns` (the clock's nominal period)
    /// where the measured tick interval is unknown or not believable ([`sample_cpu_ns`]).
    pub fn decode(&mut self, record: &[u8], cpu_period_ns: u64) -> Result<Event<'_>, DecodeError> {
        const HEAD: usize = size_of::<EventHeader>();
        if record.len() < HEAD {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: EventHeader is plain integers (any bits are valid); read_unaligned copies it.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let kind = EventKind::from_u32(h.kind).ok_or(DecodeError::UnknownKind(h.kind))?;
        let (py, k, u) = (
            h.py_count as usize,
            h.kernel_len as usize,
            h.user_len as usize,
        );
        let want = kprof_common::event_len(py, k, u);
        if py > MAX_PY_FRAMES || k > MAX_KERNEL_FRAMES || u > MAX_USER_FRAMES || record.len() < want
        {
            return Err(DecodeError::Lengths {
                len: record.len(),
                want,
            });
        }
        let body = &record[HEAD..want];
        self.words.clear();
        self.words.extend(
            body.chunks_exact(8)
                .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes"))),
        );
        let py_words = py * size_of::<PyFrame>() / 8;
        let (py_words, ips) = self.words.split_at(py_words);
        let (kernel, user) = ips.split_at(k);
        // SAFETY: PyFrame is #[repr(C)] {u64, u32, u32}: 16 bytes, 8-aligned, valid for any
        // bits; `py_words` holds exactly `py` of them, in the layout the kernel wrote.
        let py_frames: &[PyFrame] =
            unsafe { std::slice::from_raw_parts(py_words.as_ptr().cast(), py) };
        let value = match kind {
            EventKind::CpuSample => sample_cpu_ns(h.value, cpu_period_ns),
            _ => h.value,
        };
        Ok(Event {
            kind,
            value,
            count: 1,
            timestamp_ns: h.timestamp_ns,
            wait: h.wait,
            addr: h.addr,
            tgid: h.tgid,
            tid: h.tid,
            slot: h.slot,
            comm: h.comm,
            exec_id: h.exec_id,
            in_kernel: h.flags & FLAG_IN_KERNEL != 0,
            user_truncated: h.flags & FLAG_USER_TRUNCATED != 0,
            unwind_miss: h.flags & FLAG_UNWIND_MISS != 0,
            gil_held: (h.flags & FLAG_GIL_KNOWN != 0).then_some(h.flags & FLAG_GIL_HELD != 0),
            kernel,
            user,
            py: PyFrames {
                frames: py_frames,
                truncated: h.py_truncated != 0,
            },
        })
    }
}

/// A NUL-padded `comm` as a string.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the kernel lays it out, assembled by hand.
    fn record(h: EventHeader, py: &[(u64, u32, u32)], kernel: &[u64], user: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let fields32 = [h.kind, h.flags, h.tgid, h.tid, h.cpu, h.slot];
        fields32.iter().for_each(|f| out.extend(f.to_ne_bytes()));
        [h.timestamp_ns, h.value, h.cgroup_id, h.addr]
            .iter()
            .for_each(|f| out.extend(f.to_ne_bytes()));
        out.extend(h.comm);
        let tail = [
            h.exec_id,
            h.kernel_len,
            h.user_len,
            h.wait,
            h.py_count,
            h.py_truncated,
        ];
        tail.iter().for_each(|f| out.extend(f.to_ne_bytes()));
        assert_eq!(out.len(), 96);
        for &(code, lasti, flags) in py {
            out.extend(code.to_ne_bytes());
            out.extend(lasti.to_ne_bytes());
            out.extend(flags.to_ne_bytes());
        }
        kernel
            .iter()
            .chain(user)
            .for_each(|ip| out.extend(ip.to_ne_bytes()));
        out
    }

    fn header(kind: EventKind, value: u64, py: u32, k: u32, u: u32) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            value,
            tgid: 7,
            tid: 8,
            flags: FLAG_IN_KERNEL,
            comm: *b"py\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            py_count: py,
            kernel_len: k,
            user_len: u,
            py_truncated: 1,
            ..EventHeader::default()
        }
    }

    #[test]
    fn a_record_decodes_to_its_packed_stacks() {
        let bytes = record(
            header(EventKind::CpuSample, 14_000_000, 2, 1, 3),
            &[(0xc0de, 4, 1), (0xbeef, 6, 0)],
            &[0xffff_0001],
            &[0x10, 0x20, 0x30],
        );
        assert_eq!(bytes.len(), 96 + 32 + 8 + 24);
        let mut d = Decoder::default();
        let e = d.decode(&bytes, 10_101_010).unwrap();
        assert_eq!(
            (e.kind, e.value, e.tgid, e.tid),
            (EventKind::CpuSample, 14_000_000, 7, 8)
        );
        assert_eq!(e.kernel, [0xffff_0001]);
        assert_eq!(e.user, [0x10, 0x20, 0x30]);
        assert!(e.in_kernel && e.py.truncated);
        let py: Vec<_> =
            e.py.frames
                .iter()
                .map(|f| (f.code, f.lasti, f.flags))
                .collect();
        assert_eq!(py, [(0xc0de, 4, 1), (0xbeef, 6, 0)]);
        assert_eq!(comm_str(&e.comm), "py");
        // The ring may hand out a record padded to 8 bytes: the tail is ignored.
        let mut padded = bytes.clone();
        padded.extend([0; 8]);
        assert_eq!(d.decode(&padded, 1).unwrap().user, [0x10, 0x20, 0x30]);
    }

    #[test]
    fn a_cpu_samples_value_is_the_measured_tick_unless_unknown_or_impossible() {
        let mut d = Decoder::default();
        let period = 10_101_010;
        let value = |d: &mut Decoder, kind, v| {
            d.decode(&record(header(kind, v, 0, 0, 0), &[], &[], &[]), period)
                .unwrap()
                .value
        };
        assert_eq!(value(&mut d, EventKind::CpuSample, 14_000_000), 14_000_000);
        assert_eq!(value(&mut d, EventKind::CpuSample, 0), period);
        assert_eq!(value(&mut d, EventKind::CpuSample, 1_000_000_000), period);
        // Other kinds carry their value as it is.
        assert_eq!(
            value(&mut d, EventKind::OffCpuEnd, 1_000_000_000),
            1_000_000_000
        );
    }

    #[test]
    fn bad_records_are_refused_not_trusted() {
        let mut d = Decoder::default();
        let ok = record(
            header(EventKind::CpuSample, 1, 1, 2, 2),
            &[(1, 0, 0)],
            &[1, 2],
            &[3, 4],
        );
        assert_eq!(d.decode(&ok[..40], 1).unwrap_err(), DecodeError::Short(40));
        let short = &ok[..ok.len() - 8];
        assert!(matches!(
            d.decode(short, 1).unwrap_err(),
            DecodeError::Lengths { .. }
        ));
        let mut unknown = ok.clone();
        unknown[..4].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(
            d.decode(&unknown, 1).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
        // Counts beyond the kernel's maxima are refused even when the bytes are there.
        let huge = header(EventKind::CpuSample, 1, 0, 500, 0);
        let bytes = record(huge, &[], &vec![0; 500], &[]);
        assert!(matches!(
            d.decode(&bytes, 1).unwrap_err(),
            DecodeError::Lengths { .. }
        ));
    }
}
