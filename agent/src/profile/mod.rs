//! The aggregated profile of one kind over one window: symbolized stacks with counts, summed
//! values and labels. Everything that is written (pprof, flame graph, top table) is derived
//! from this one model.
pub mod frame;
pub mod memory;
pub mod module;
pub mod summary;
pub mod threads;
pub mod wait;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use frame::{Frame, FrameKind};
pub use memory::MemoryReport;
pub use module::{ModuleId, ModuleInfo};
pub use threads::ThreadReport;
pub use wait::{ThreadState, Wait, WaitClass};

/// What a sample is aggregated by: process, thread (id and name), how the thread spent the
/// time (wall and lock profiles) and the stack (innermost first).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub pid: u32,
    /// Thread id (0: not known).
    pub tid: u32,
    pub thread: Arc<str>,
    /// `None` in CPU profiles.
    pub wait: Option<Wait>,
    /// On-CPU time of a Python thread whose process's GIL is known: whether it held the GIL.
    pub gil_held: Option<bool>,
    pub stack: Arc<[Frame]>,
}

impl SampleKey {
    /// A key of a process's main thread with no wait labels (tests, synthetic profiles).
    pub fn of(pid: u32, thread: &str, stack: Vec<Frame>) -> Self {
        SampleKey {
            pid,
            tid: pid,
            thread: thread.into(),
            wait: None,
            gil_held: None,
            stack: stack.into(),
        }
    }
}

/// Kubernetes and host labels of the profile (empty strings in standalone mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub node: String,
}

/// What is known about a profiled process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessMeta {
    /// Process name (`comm` of the thread-group leader, or of the first thread seen).
    pub name: String,
    /// Detected runtime, e.g. `cpython 3.12.1`; `None` for native code.
    pub runtime: Option<String>,
}

/// What a profile measures, with the settings specific to that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileKind {
    /// On-CPU samples of a clock ticking `sample_hz` times a second.
    Cpu { sample_hz: u32 },
    /// Wall-clock time per thread: its CPU samples (state `running`) plus its off-CPU
    /// intervals (by state and wait class), in nanoseconds.
    Wall { sample_hz: u32 },
    /// Time blocked on locks (futex waits outside the GIL), by lock site and lock.
    Lock,
    /// Threads by the stack that created them: created in the window (the count) and alive at
    /// its end (the value), one sample per thread; counts, idle threads and leaks in
    /// [`AggregatedProfile::threads`].
    Threads,
    /// Memory by the stack that first touched it: sampled minor page faults, each standing
    /// for `period_bytes`; bytes touched in the window (alloc) and still held at its end
    /// (in use); and the large blocks mapped by the stack that asked for them, exact (mapped,
    /// mapped in use); with heap usage and leaks in [`AggregatedProfile::memory`].
    Memory { period_bytes: u64 },
}

impl ProfileKind {
    /// The pprof sample types this kind is written with.
    pub fn pprof_types(self) -> &'static kprof_pprof::types::KindTypes {
        match self {
            ProfileKind::Cpu { .. } => &kprof_pprof::types::CPU,
            ProfileKind::Wall { .. } => &kprof_pprof::types::WALL,
            ProfileKind::Lock => &kprof_pprof::types::LOCK,
            ProfileKind::Threads => &kprof_pprof::types::THREADS,
            ProfileKind::Memory { .. } => &kprof_pprof::types::MEMORY,
        }
    }

    /// The kind written for an asked profile type (`None`: not built yet).
    pub fn of_type(ty: kprof_crds::ProfileType, sample_hz: u32) -> ProfileKind {
        use kprof_crds::ProfileType as T;
        match ty {
            T::Cpu => ProfileKind::Cpu { sample_hz },
            T::Wall => ProfileKind::Wall { sample_hz },
            T::Lock => ProfileKind::Lock,
            T::Threads => ProfileKind::Threads,
            T::Memory => ProfileKind::Memory {
                period_bytes: crate::kernel::loader::DEFAULT_FAULT_PERIOD
                    * kprof_common::PAGE_BYTES,
            },
        }
    }

    /// Whether this kind needs the off-CPU source (the `sched_switch` program).
    pub fn needs_off_cpu(self) -> bool {
        matches!(self, ProfileKind::Wall { .. } | ProfileKind::Lock)
    }

    /// The kind's name in the API, on the command line and in file names.
    pub fn name(self) -> &'static str {
        self.pprof_types().name
    }

    /// Whether events of `kind` with these wait labels belong to a profile of this kind.
    pub fn takes(self, kind: crate::pipeline::event::EventKind, wait: Option<&Wait>) -> bool {
        use crate::pipeline::event::EventKind as E;
        match self {
            ProfileKind::Cpu { .. } => kind == E::CpuSample,
            ProfileKind::Wall { .. } => matches!(kind, E::CpuSample | E::OffCpu),
            ProfileKind::Lock => {
                kind == E::OffCpu && wait.is_some_and(|w| w.class == Some(WaitClass::Lock))
            }
            // Built from the thread and memory ledgers, not from aggregated events.
            ProfileKind::Threads | ProfileKind::Memory { .. } => false,
        }
    }

    /// The value one event stands for when it carries none of its own (a CPU tick: 1/Hz).
    pub fn nominal_value(self) -> u64 {
        match self {
            ProfileKind::Cpu { sample_hz } => 1_000_000_000 / u64::from(sample_hz.max(1)),
            ProfileKind::Memory { period_bytes } => period_bytes,
            ProfileKind::Wall { .. } | ProfileKind::Lock | ProfileKind::Threads => 0,
        }
    }

    /// Whether this kind needs thread creations and exits recorded.
    pub fn needs_thread_events(self) -> bool {
        self == ProfileKind::Threads
    }

    /// The memory source's sampling period in page faults (`None`: not a memory profile).
    pub fn fault_period(self) -> Option<u64> {
        match self {
            ProfileKind::Memory { period_bytes } => {
                Some((period_bytes / kprof_common::PAGE_BYTES).max(1))
            }
            _ => None,
        }
    }

    /// The pprof values of one sample (in [`ProfileKind::pprof_types`] order); memory
    /// profiles add the bytes still held (`inuse`).
    pub fn pprof_values(self, count: u64, value: u64, inuse: u64) -> Vec<i64> {
        let page = kprof_common::PAGE_BYTES;
        let (count, value) = (count as i64, value as i64);
        match self {
            ProfileKind::Cpu { .. } | ProfileKind::Lock | ProfileKind::Threads => {
                vec![count, value]
            }
            ProfileKind::Wall { .. } => vec![value, count],
            ProfileKind::Memory { .. } => vec![
                value,
                value / page as i64,
                inuse as i64,
                (inuse / page) as i64,
            ],
        }
    }
}

/// Where the time of a wall or lock profile went ([`AggregatedProfile::time_split`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimeSplit {
    pub by_state: BTreeMap<ThreadState, u64>,
    pub by_class: BTreeMap<WaitClass, u64>,
    /// Thread id → (name, nanoseconds).
    pub by_thread: BTreeMap<u32, (Arc<str>, u64)>,
}

/// A map keyed by samples. Keys hash whole stacks (every frame's names and lines), thousands
/// per window: foldhash does that several times faster than std's SipHash, whose resistance to
/// chosen collisions buys nothing here (a tenant cannot choose the stacks a window holds in
/// numbers that matter; the window's size is bounded).
pub type KeyMap<V> = HashMap<SampleKey, V, foldhash::fast::RandomState>;

/// The entries of `map` whose process is in `pids` (a container's share of a node's window).
pub fn keys_of_pids<V: Clone>(map: &KeyMap<V>, pids: &BTreeSet<u32>) -> KeyMap<V> {
    map.iter()
        .filter(|(k, _)| pids.contains(&k.pid))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The items whose process (`pid_of`) is in `pids`.
pub fn items_of_pids<T: Clone>(
    items: &[T],
    pids: &BTreeSet<u32>,
    pid_of: impl Fn(&T) -> u32,
) -> Vec<T> {
    items
        .iter()
        .filter(|t| pids.contains(&pid_of(t)))
        .cloned()
        .collect()
}

/// An aggregated profile of one kind.
#[derive(Clone, Debug)]
pub struct AggregatedProfile {
    pub kind: ProfileKind,
    /// Events per key.
    pub samples: KeyMap<u64>,
    /// The sum of the events' values per key (nanoseconds for CPU and off-CPU), same keys as
    /// `samples`.
    pub values: KeyMap<u64>,
    pub start: SystemTime,
    pub duration: Duration,
    pub labels: ProfileLabels,
    pub processes: BTreeMap<u32, ProcessMeta>,
    /// Samples lost in kernel (ring buffer full).
    pub dropped: u64,
    /// Modules seen (for pprof mappings and build ids).
    pub modules: Vec<ModuleInfo>,
    pub warnings: Vec<String>,
    /// Threads profiles: counts, every thread, idle threads and leaks.
    pub threads: Option<ThreadReport>,
    /// Memory profiles: bytes held per stack, heap usage, leaks.
    pub memory: Option<MemoryReport>,
}

impl AggregatedProfile {
    /// An empty CPU profile.
    pub fn new(sample_hz: u32, start: SystemTime) -> Self {
        Self::of_kind(ProfileKind::Cpu { sample_hz }, start)
    }

    /// An empty profile of any kind.
    pub fn of_kind(kind: ProfileKind, start: SystemTime) -> Self {
        AggregatedProfile {
            kind,
            samples: KeyMap::default(),
            values: KeyMap::default(),
            start,
            duration: Duration::ZERO,
            labels: ProfileLabels::default(),
            processes: BTreeMap::new(),
            dropped: 0,
            modules: Vec::new(),
            warnings: Vec::new(),
            threads: None,
            memory: None,
        }
    }

    /// Adds `count` events that carry no value of their own (each stands for the kind's
    /// nominal value).
    pub fn add(&mut self, key: SampleKey, count: u64) {
        let value = count.saturating_mul(self.kind.nominal_value());
        self.add_value(key, count, value);
    }

    /// Adds `count` events whose values sum to `value`.
    pub fn add_value(&mut self, key: SampleKey, count: u64, value: u64) {
        *self.values.entry(key.clone()).or_default() += value;
        *self.samples.entry(key).or_default() += count;
    }

    /// The summed value of one key.
    pub fn value_of(&self, key: &SampleKey) -> u64 {
        self.values.get(key).copied().unwrap_or(0)
    }

    /// The summed value of every key.
    pub fn total_value(&self) -> u64 {
        self.values.values().sum()
    }

    /// The sampling rate of a CPU profile (`None` for other kinds).
    pub fn sample_hz(&self) -> Option<u32> {
        match self.kind {
            ProfileKind::Cpu { sample_hz } => Some(sample_hz),
            ProfileKind::Wall { .. }
            | ProfileKind::Lock
            | ProfileKind::Threads
            | ProfileKind::Memory { .. } => None,
        }
    }

    /// Whether the profile has anything to show: samples; for memory profiles, memory touched
    /// in the window or still held.
    pub fn has_data(&self) -> bool {
        match self.kind {
            ProfileKind::Memory { .. } => !self.samples.is_empty(),
            _ => self.total() > 0,
        }
    }

    /// Total number of samples.
    pub fn total(&self) -> u64 {
        self.samples.values().sum()
    }

    /// The pprof period: what one sampling event stands for (a CPU tick's nanoseconds, a
    /// page-fault sample's bytes; 0 for kinds whose events carry their own values).
    pub fn period_ns(&self) -> i64 {
        self.kind.nominal_value() as i64
    }

    /// The pprof values of one of this profile's samples.
    pub fn pprof_values(&self, key: &SampleKey, count: u64) -> Vec<i64> {
        let mut values = self
            .kind
            .pprof_values(count, self.value_of(key), self.inuse_of(key));
        if matches!(self.kind, ProfileKind::Memory { .. }) {
            let ((calls, bytes), (regions, held)) = self.mapped_of(key);
            values.extend([bytes, calls, held, regions].map(|v| v as i64));
            let ((samples, bytes), (live, held)) = self.probed_of(key);
            values.extend([bytes, samples, held, live].map(|v| v as i64));
        }
        values
    }

    /// Samples sorted by key (deterministic output).
    pub fn sorted_samples(&self) -> Vec<(&SampleKey, u64)> {
        let mut v: Vec<_> = self.samples.iter().map(|(k, &c)| (k, c)).collect();
        v.sort();
        v
    }

    /// Where the time of a profile with wait labels (wall, lock) went, in nanoseconds: per
    /// state, per wait class and per thread (its name and total).
    pub fn time_split(&self) -> TimeSplit {
        let mut split = TimeSplit::default();
        for (k, v) in &self.values {
            let Some(w) = k.wait else { continue };
            *split.by_state.entry(w.state).or_default() += v;
            if let Some(c) = w.class {
                *split.by_class.entry(c).or_default() += v;
            }
            split
                .by_thread
                .entry(k.tid)
                .or_insert_with(|| (k.thread.clone(), 0))
                .1 += v;
        }
        split
    }

    /// `ns` as a percentage of the window, to one decimal.
    pub fn percent_of_window(&self, ns: u64) -> f64 {
        (ns as f64 * 1000.0 / self.duration.as_nanos().max(1) as f64).round() / 10.0
    }

    /// Per thread id: nanoseconds on CPU holding the GIL, and nanoseconds waiting for it.
    /// `None` when no sample knew its process's GIL.
    pub fn gil_by_thread(&self) -> Option<BTreeMap<u32, (u64, u64)>> {
        let mut known = false;
        let mut threads: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for (k, v) in &self.values {
            if let Some(held) = k.gil_held {
                known = true;
                if held {
                    threads.entry(k.tid).or_default().0 += v;
                }
            }
            if k.wait.is_some_and(|w| w.class == Some(WaitClass::Gil)) {
                threads.entry(k.tid).or_default().1 += v;
            }
        }
        known.then_some(threads)
    }

    /// Average cores used by the profiled processes of a CPU profile: CPU nanoseconds ÷
    /// wall nanoseconds (0 for other kinds).
    pub fn cpu_cores(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs <= 0.0 || self.sample_hz().is_none() {
            return 0.0;
        }
        self.total_value() as f64 / 1e9 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_cpu() {
        let mut p = AggregatedProfile::new(100, SystemTime::UNIX_EPOCH);
        let stack: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, "f")].into();
        let key = SampleKey::of(1, "t", stack.to_vec());
        p.add(key.clone(), 150);
        p.add(key, 50);
        p.duration = Duration::from_secs(2);
        assert_eq!(p.total(), 200);
        assert_eq!(p.period_ns(), 10_000_000);
        assert!((p.cpu_cores() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn values_are_summed_per_key_and_written_in_the_kinds_order() {
        let wall = ProfileKind::Wall { sample_hz: 99 };
        let mut p = AggregatedProfile::of_kind(wall, SystemTime::UNIX_EPOCH);
        let key = SampleKey::of(1, "t", vec![Frame::new(FrameKind::Native, "wait")]);
        p.add_value(key.clone(), 1, 2_000);
        p.add_value(key.clone(), 2, 500);
        assert_eq!(
            (p.total(), p.value_of(&key), p.total_value()),
            (3, 2_500, 2_500)
        );
        assert_eq!(p.period_ns(), 0);
        assert_eq!(p.sample_hz(), None);
        assert_eq!(p.kind.pprof_values(3, 2_500, 0), [2_500, 3]);
        assert_eq!(p.kind.pprof_types().sample_types[0].r#type, "wall");
        assert_eq!(ProfileKind::Lock.pprof_values(3, 2_500, 0), [3, 2_500]);
        assert_eq!(ProfileKind::Lock.name(), "lock");
        let cpu = ProfileKind::Cpu { sample_hz: 100 };
        assert_eq!(cpu.pprof_values(3, 30_000_000, 0), [3, 30_000_000]);
        assert_eq!(cpu.pprof_types().name, "cpu");
    }
}
