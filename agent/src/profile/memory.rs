//! What a memory profile reports besides its samples: how much memory each process and its
//! container held over the window, where the sampled bytes went, and the processes whose heap
//! grows steadily.
use std::sync::Arc;

use super::{AggregatedProfile, Frame, KeyMap, SampleKey};
use crate::proc::memory::{CgroupMemory, ResidentMemory};

/// One process's resident memory over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessUsage {
    pub pid: u32,
    pub name: String,
    /// (CLOCK_MONOTONIC ns, resident memory), read about every second and at the end.
    pub series: Vec<(u64, ResidentMemory)>,
    /// (CLOCK_MONOTONIC ns, bytes) of the runtime's own heap (Python: pymalloc's arenas, the
    /// objects of up to 512 bytes), read with `series`; empty when not a runtime or not
    /// readable (a warning says why).
    pub runtime_heap: Vec<(u64, u64)>,
    /// A process that shares memory copy-on-write (forked without `exec`, or the parent of
    /// one): its proportional share of anonymous memory at the end (PSS), which adds up over
    /// the processes where their resident figures count the shared pages in each.
    pub pss_anon: Option<u64>,
    /// The profiled process it was forked from without `exec` (a pre-fork worker).
    pub forked_from: Option<u32>,
}

impl ProcessUsage {
    /// The last reading.
    pub fn end(&self) -> Option<ResidentMemory> {
        self.series.last().map(|p| p.1)
    }

    /// The runtime's heap at the last reading.
    pub fn runtime_heap_end(&self) -> Option<u64> {
        self.runtime_heap.last().map(|p| p.1)
    }

    /// Anonymous memory at the end that is this process's own: its proportional share when
    /// it shares pages with a parent or children, else its resident anonymous memory.
    pub fn own_anon(&self) -> Option<u64> {
        self.pss_anon.or_else(|| self.end().map(|m| m.anon))
    }

    /// The least and the most anonymous memory read.
    pub fn anon_range(&self) -> (u64, u64) {
        let anon = self.series.iter().map(|p| p.1.anon);
        (anon.clone().min().unwrap_or(0), anon.max().unwrap_or(0))
    }
}

/// One memory cgroup (a container) over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// The profiled processes in it.
    pub pids: Vec<u32>,
    /// (CLOCK_MONOTONIC ns, reading), about every second and at the end.
    pub series: Vec<(u64, CgroupMemory)>,
    /// Processes the kernel's OOM killer killed in it during the window.
    pub oom_kills: u64,
}

impl CgroupUsage {
    pub fn end(&self) -> Option<CgroupMemory> {
        self.series.last().map(|p| p.1)
    }
}

/// A process whose anonymous memory grows steadily.
#[derive(Clone, Debug, PartialEq)]
pub struct HeapLeak {
    pub pid: u32,
    pub name: String,
    /// Anonymous bytes when the growth was first seen and at the end.
    pub from_bytes: u64,
    pub to_bytes: u64,
    /// Over how long.
    pub seconds: f64,
    /// The stacks that touched most of the memory still held that was first touched while it
    /// grew, with their bytes (largest first, at most three).
    pub grown_by: Vec<(Arc<[Frame]>, u64)>,
}

impl HeapLeak {
    /// The warning put on the process's profiles.
    pub fn message(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let rate =
            mib(self.to_bytes.saturating_sub(self.from_bytes)) / self.seconds.max(1.0) * 60.0;
        let by = if self.grown_by.is_empty() {
            String::new()
        } else {
            let sites: Vec<String> = self
                .grown_by
                .iter()
                .map(|(stack, bytes)| format!("{} ({:.1} MiB)", site(stack), mib(*bytes)))
                .collect();
            format!("; grown by {}", sites.join(", "))
        };
        format!(
            "pid {}: memory leak suspected: the heap of {} grows steadily, {:.1} → {:.1} MiB \
             over {:.0} s ({rate:.1} MiB/min){by}",
            self.pid,
            self.name,
            mib(self.from_bytes),
            mib(self.to_bytes),
            self.seconds
        )
    }
}

/// A stack's most telling frame: the innermost Python frame, else the innermost native one
/// outside the kernel.
pub fn site(stack: &[Frame]) -> String {
    stack
        .iter()
        .find(|f| f.kind == super::FrameKind::Python)
        .or_else(|| stack.iter().find(|f| f.kind != super::FrameKind::Kernel))
        .or(stack.first())
        .map_or_else(|| "[unknown]".to_owned(), ToString::to_string)
}

/// What the sampled page faults of a window add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultTotals {
    /// Samples, and the bytes they stand for, in anonymous memory (what the profile shows).
    pub samples: u64,
    pub bytes: u64,
    /// Bytes of samples in mapped files (code and data files read in: not the heap).
    pub file_bytes: u64,
    /// Pages kept for the in-use view (the held set), and samples it had no room for.
    pub tracked: u64,
    pub untracked: u64,
}

/// The memory figures of a window.
#[derive(Clone, Debug, Default)]
pub struct MemoryReport {
    /// Bytes first touched in the window, by stack: (samples, bytes).
    pub alloc: KeyMap<(u64, u64)>,
    /// Bytes first touched since profiling began and still held at the window's end, by stack.
    pub inuse: KeyMap<u64>,
    /// Anonymous memory mapped and heap growth in the window, by stack: (calls, bytes), exact.
    pub mapped: KeyMap<(u64, u64)>,
    /// Of the memory mapped or grown since profiling began, what is still there at the
    /// window's end, by the stack that asked for it: (regions, bytes).
    pub mapped_inuse: KeyMap<(u64, u64)>,
    /// Allocation probes (on demand): the sampled allocations of the window, by stack:
    /// (samples, bytes they stand for).
    pub probed: KeyMap<(u64, u64)>,
    /// Of the allocations sampled since profiling began, those not reported freed at the
    /// window's end: (samples, bytes).
    pub probed_inuse: KeyMap<(u64, u64)>,
    pub processes: Vec<ProcessUsage>,
    /// The memory cgroups (containers) of the profiled processes.
    pub cgroups: Vec<CgroupUsage>,
    pub faults: FaultTotals,
    pub leaks: Vec<HeapLeak>,
    pub warnings: Vec<String>,
}

impl MemoryReport {
    /// Only the processes in `pids` (a container's share of a node-wide report).
    pub fn only(&self, pids: &std::collections::BTreeSet<u32>) -> MemoryReport {
        MemoryReport {
            alloc: super::keys_of_pids(&self.alloc, pids),
            inuse: super::keys_of_pids(&self.inuse, pids),
            mapped: super::keys_of_pids(&self.mapped, pids),
            mapped_inuse: super::keys_of_pids(&self.mapped_inuse, pids),
            probed: super::keys_of_pids(&self.probed, pids),
            probed_inuse: super::keys_of_pids(&self.probed_inuse, pids),
            processes: super::items_of_pids(&self.processes, pids, |p| p.pid),
            leaks: super::items_of_pids(&self.leaks, pids, |l| l.pid),
            cgroups: self
                .cgroups
                .iter()
                .filter(|c| c.pids.iter().any(|p| pids.contains(p)))
                .cloned()
                .collect(),
            faults: self.faults,
            warnings: self.warnings.clone(),
        }
    }
}

impl AggregatedProfile {
    /// Fills a memory profile from its report: a sample per stack that touched memory in the
    /// window or holds memory it touched before.
    pub fn add_memory(&mut self, report: MemoryReport) {
        for (key, &(count, bytes)) in &report.alloc {
            self.add_value(key.clone(), count, bytes);
        }
        let held = report
            .inuse
            .keys()
            .chain(report.mapped.keys())
            .chain(report.mapped_inuse.keys())
            .chain(report.probed.keys())
            .chain(report.probed_inuse.keys());
        for key in held {
            self.samples.entry(key.clone()).or_insert(0);
            self.values.entry(key.clone()).or_insert(0);
        }
        for leak in &report.leaks {
            let w = leak.message();
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
        for w in &report.warnings {
            if !self.warnings.contains(w) {
                self.warnings.push(w.clone());
            }
        }
        self.memory = Some(report);
    }

    /// Bytes of a memory profile's stack still held at the window's end.
    pub fn inuse_of(&self, key: &SampleKey) -> u64 {
        self.memory
            .as_ref()
            .and_then(|m| m.inuse.get(key).copied())
            .unwrap_or(0)
    }

    /// A memory profile's mapped and mapped in-use (count, bytes) of a stack.
    pub fn mapped_of(&self, key: &SampleKey) -> ((u64, u64), (u64, u64)) {
        self.memory.as_ref().map_or_else(Default::default, |m| {
            (
                m.mapped.get(key).copied().unwrap_or_default(),
                m.mapped_inuse.get(key).copied().unwrap_or_default(),
            )
        })
    }

    /// A memory profile's probed and probed in-use (samples, bytes) of a stack.
    pub fn probed_of(&self, key: &SampleKey) -> ((u64, u64), (u64, u64)) {
        self.memory.as_ref().map_or_else(Default::default, |m| {
            (
                m.probed.get(key).copied().unwrap_or_default(),
                m.probed_inuse.get(key).copied().unwrap_or_default(),
            )
        })
    }

    /// Bytes of a memory profile still held at the window's end.
    pub fn total_inuse(&self) -> u64 {
        self.memory.as_ref().map_or(0, |m| m.inuse.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{FrameKind, ProfileKind};

    #[test]
    fn a_containers_share_of_a_report_has_only_its_processes() {
        let key = |pid: u32| SampleKey::of(pid, "w", vec![Frame::new(FrameKind::Python, "f")]);
        let usage = |pid: u32| ProcessUsage {
            pid,
            name: "python3".into(),
            series: Vec::new(),
            runtime_heap: Vec::new(),
            pss_anon: None,
            forked_from: None,
        };
        let mut report = MemoryReport::default();
        for pid in [1, 2] {
            report.alloc.insert(key(pid), (1, 1 << 18));
            report.inuse.insert(key(pid), 1 << 18);
            report.processes.push(usage(pid));
            report.cgroups.push(CgroupUsage {
                pids: vec![pid],
                series: Vec::new(),
                oom_kills: u64::from(pid),
            });
        }
        report
            .warnings
            .push("pid 2: its page map cannot be read".into());
        let mine = report.only(&[1].into());
        assert_eq!(mine.alloc.keys().collect::<Vec<_>>(), [&key(1)]);
        assert_eq!(mine.inuse.keys().collect::<Vec<_>>(), [&key(1)]);
        assert_eq!(
            mine.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(
            mine.cgroups.iter().map(|c| c.oom_kills).collect::<Vec<_>>(),
            [1]
        );
        // Warnings are split by the window (`filter_pids`), with the samples' other warnings.
        assert_eq!(mine.warnings, report.warnings);
    }

    #[test]
    fn a_memory_profile_holds_alloc_and_inuse_per_stack_and_says_who_leaks() {
        let key = |f: &str| SampleKey::of(9, "w", vec![Frame::new(FrameKind::Python, f)]);
        let mut report = MemoryReport::default();
        report.alloc.insert(key("churn"), (10, 10 << 18));
        report.alloc.insert(key("keep"), (4, 4 << 18));
        report.inuse.insert(key("keep"), 4 << 18);
        report.inuse.insert(key("old_cache"), 8 << 18);
        report.mapped.insert(key("keep"), (2, 2 << 20));
        report.mapped_inuse.insert(key("keep"), (1, 1 << 20));
        report.mapped_inuse.insert(key("arena"), (3, 3 << 20));
        report.probed.insert(key("array"), (4, 4 << 19));
        report.probed_inuse.insert(key("array"), (1, 1 << 19));
        report.leaks.push(HeapLeak {
            pid: 9,
            name: "python3".into(),
            from_bytes: 10 << 20,
            to_bytes: 40 << 20,
            seconds: 30.0,
            grown_by: vec![(key("keep").stack.clone(), 1 << 20)],
        });
        let mut p = AggregatedProfile::of_kind(
            ProfileKind::Memory {
                period_bytes: 1 << 18,
            },
            std::time::SystemTime::UNIX_EPOCH,
        );
        p.add_memory(report);
        assert_eq!(p.total(), 14);
        assert_eq!(
            p.samples.len(),
            5,
            "a stack that only holds memory is a sample too"
        );
        assert_eq!(p.total_inuse(), 12 << 18);
        assert_eq!(p.inuse_of(&key("churn")), 0);
        assert_eq!(
            p.pprof_values(&key("keep"), 4),
            [
                4 << 18,
                4 << 6,
                4 << 18,
                4 << 6,
                2 << 20,
                2,
                1 << 20,
                1,
                0,
                0,
                0,
                0
            ]
        );
        assert_eq!(
            p.pprof_values(&key("old_cache"), 0),
            [0, 0, 8 << 18, 8 << 6, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            p.pprof_values(&key("array"), 0),
            [0, 0, 0, 0, 0, 0, 0, 0, 4 << 19, 4, 1 << 19, 1]
        );
        assert_eq!(
            p.pprof_values(&key("arena"), 0),
            [0, 0, 0, 0, 0, 0, 3 << 20, 3, 0, 0, 0, 0]
        );
        assert!(
            p.warnings[0].contains("leak suspected")
                && p.warnings[0].starts_with("pid 9: ")
                && p.warnings[0].contains("60.0 MiB/min")
                && p.warnings[0].contains("keep"),
            "{}",
            p.warnings[0]
        );
    }
}
