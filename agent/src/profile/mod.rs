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
    pub samples: HashMap<SampleKey, u64>,
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

    pub fn add(&mut self, key: SampleKey, count: u64) {
        *self.samples.entry(key).or_default() += count;
    }

    /// Total number of samples.
    pub fn total(&self) -> u64 {
        self.samples.values().sum()
    }

    /// Nanoseconds of CPU one sample stands for.
    pub fn period_ns(&self) -> i64 {
        1_000_000_000 / i64::from(self.sample_hz.max(1))
    }

    /// Samples sorted by key (deterministic output).
    pub fn sorted_samples(&self) -> Vec<(&SampleKey, u64)> {
        let mut v: Vec<_> = self.samples.iter().map(|(k, &c)| (k, c)).collect();
        v.sort();
        v
    }

    /// Average cores used by the profiled processes: samples ÷ (Hz × seconds).
    pub fn cpu_cores(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.total() as f64 / (f64::from(self.sample_hz.max(1)) * secs)
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
        p.add(key.clone(), 150);
        p.add(key, 50);
        p.duration = Duration::from_secs(2);
        assert_eq!(p.total(), 200);
        assert_eq!(p.period_ns(), 10_000_000);
        assert!((p.cpu_cores() - 1.0).abs() < 1e-9);
    }
}
