//! The aggregated profile of one window: symbolized stacks with counts and labels. Everything
//! that is written (pprof, flame graph, top table) is derived from this one model.
pub mod frame;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use frame::{Frame, FrameKind};

use crate::symbolize::ModuleInfo;

/// What a sample is aggregated by: process, thread name and the stack (innermost first).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub pid: u32,
    pub thread: Arc<str>,
    pub stack: Arc<[Frame]>,
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

/// An aggregated CPU profile.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Samples per stack.
    pub samples: HashMap<SampleKey, u64>,
    /// CPU nanoseconds per stack: what its samples stand for (the clock's period is jittered, so
    /// this is measured per sample, not samples × a nominal period).
    pub cpu_ns: HashMap<SampleKey, u64>,
    /// The nominal rate (the clock's average).
    pub sample_hz: u32,
    pub start: SystemTime,
    pub duration: Duration,
    pub labels: ProfileLabels,
    pub processes: BTreeMap<u32, ProcessMeta>,
    /// Samples lost in kernel (ring buffer full).
    pub dropped: u64,
    /// Modules seen (for pprof mappings and build ids).
    pub modules: Vec<ModuleInfo>,
    pub warnings: Vec<String>,
}

impl Profile {
    pub fn new(sample_hz: u32, start: SystemTime) -> Self {
        Profile {
            samples: HashMap::new(),
            cpu_ns: HashMap::new(),
            sample_hz,
            start,
            duration: Duration::ZERO,
            labels: ProfileLabels::default(),
            processes: BTreeMap::new(),
            dropped: 0,
            modules: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Adds `count` samples of `key` at the nominal period each.
    pub fn add(&mut self, key: SampleKey, count: u64) {
        let cpu_ns = count.saturating_mul(self.period_ns() as u64);
        self.add_measured(key, count, cpu_ns);
    }

    /// Adds `count` samples of `key` that stand for `cpu_ns` nanoseconds of CPU.
    pub fn add_measured(&mut self, key: SampleKey, count: u64, cpu_ns: u64) {
        *self.cpu_ns.entry(key.clone()).or_default() += cpu_ns;
        *self.samples.entry(key).or_default() += count;
    }

    /// Total number of samples.
    pub fn total(&self) -> u64 {
        self.samples.values().sum()
    }

    /// CPU nanoseconds of a stack.
    pub fn cpu_ns_of(&self, key: &SampleKey) -> u64 {
        self.cpu_ns.get(key).copied().unwrap_or(0)
    }

    /// Total CPU nanoseconds.
    pub fn total_cpu_ns(&self) -> u64 {
        self.cpu_ns.values().sum()
    }

    /// Nanoseconds of CPU one sample stands for on average (the nominal period, 1/Hz).
    pub fn period_ns(&self) -> i64 {
        1_000_000_000 / i64::from(self.sample_hz.max(1))
    }

    /// Samples sorted by key (deterministic output).
    pub fn sorted_samples(&self) -> Vec<(&SampleKey, u64)> {
        let mut v: Vec<_> = self.samples.iter().map(|(k, &c)| (k, c)).collect();
        v.sort();
        v
    }

    /// Average cores used by the profiled processes: CPU nanoseconds ÷ window nanoseconds.
    pub fn cpu_cores(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.total_cpu_ns() as f64 / 1e9 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_cpu() {
        let mut p = Profile::new(100, SystemTime::UNIX_EPOCH);
        let stack: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, "f")].into();
        let key = SampleKey {
            pid: 1,
            thread: "t".into(),
            stack,
        };
        p.add_measured(key.clone(), 150, 1_400_000_000);
        p.add_measured(key.clone(), 50, 600_000_000);
        p.duration = Duration::from_secs(2);
        assert_eq!(p.total(), 200);
        assert_eq!(p.cpu_ns_of(&key), 2_000_000_000);
        assert_eq!(p.period_ns(), 10_000_000);
        assert!((p.cpu_cores() - 1.0).abs() < 1e-9);
        // Without measured intervals a sample stands for the nominal period.
        let mut q = Profile::new(100, SystemTime::UNIX_EPOCH);
        q.add(key.clone(), 3);
        assert_eq!(q.cpu_ns_of(&key), 30_000_000);
    }
}
